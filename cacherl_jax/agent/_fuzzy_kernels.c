/* Compiled inner loops of the tool cache's fuzzy search (cacherl_jax/agent/tool_cache.py).
 *
 * A lookup's work is a few dozen small steps, and in CPython each costs about a microsecond: the
 * one-edit neighbour search alone was a third of a perturbed call's lookup. These functions do
 * the same steps in C with the same results, bit for bit (the Python code they replace stays,
 * as the reference the tests compare with and as the fallback where this module is not built):
 *
 *   indel_ratio(a, b)     rapidfuzz's fuzz.ratio: 100 * (1 - Indel distance / (len a + len b)).
 *   edit_hashes(text)     tool_cache._edit_hashes: the text's hash, then each one-deletion's.
 *   edit_neighbours(...)  _Column.edit_neighbours' search: {value id: ratio} of the values an
 *                         _EditIndex's hashes meet, ids ascending.
 *   best_entry(...)       _Block._best's loop: the best-scoring of some entries.
 *   gather_postings(...)  _Block._neighbour_candidates' loop: the entries holding values more
 *                         similar than their bound.
 *   canonical_arguments(...)  tool_cache.canonical_arguments for flat dicts, the usual call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_TEXT 64 /* EDIT_MAX_LENGTH: the index holds texts up to this length */
/* tool_cache's value kinds: _NUMBER (ints, floats) and _EXACT_ONLY (booleans, null). */
#define KIND_NUMBER 1
#define KIND_EXACT_ONLY 2

/* tool_cache's hash constants: polynomial hashes mod 2**64 over code point + 1. */
static const uint64_t BASE = 0x9E3779B97F4A7C15ULL;
static const uint64_t LENGTH_MIX = 0xD6E8FEB86659FD93ULL;

typedef struct {
    int kind;
    const void *data;
    Py_ssize_t length;
} Text;

static int text_of(PyObject *object, Text *text) {
    if (!PyUnicode_Check(object)) {
        PyErr_Format(PyExc_TypeError, "expected str, got %.80s", Py_TYPE(object)->tp_name);
        return -1;
    }
    text->kind = PyUnicode_KIND(object);
    text->data = PyUnicode_DATA(object);
    text->length = PyUnicode_GET_LENGTH(object);
    return 0;
}

#define CHAR(text, i) PyUnicode_READ((text).kind, (text).data, (i))

static PyObject *rapidfuzz_ratio; /* rapidfuzz.fuzz.ratio, for two texts over 64 characters */

/* Match bits of a text of at most 64 characters, for the bit-parallel LCS (Allison-Dix,
 * Hyyro): bit i of a character's word is set where the text holds it. */
typedef struct {
    uint64_t table[256]; /* characters below 256 */
    Py_UCS4 wide[64];    /* the others, with theirs */
    uint64_t wide_bits[64];
    int wide_count;
    Py_ssize_t length;
} Pattern;

static void pattern_of(Text a, Pattern *pattern) {
    memset(pattern->table, 0, sizeof pattern->table);
    pattern->wide_count = 0;
    pattern->length = a.length;
    for (Py_ssize_t i = 0; i < a.length; i++) {
        Py_UCS4 c = CHAR(a, i);
        if (c < 256) {
            pattern->table[c] |= 1ULL << i;
            continue;
        }
        int k = 0;
        while (k < pattern->wide_count && pattern->wide[k] != c) k++;
        if (k == pattern->wide_count) {
            pattern->wide[k] = c;
            pattern->wide_bits[k] = 0;
            pattern->wide_count++;
        }
        pattern->wide_bits[k] |= 1ULL << i;
    }
}

/* Length of the longest common subsequence of the pattern's text and `b` (any length). */
static Py_ssize_t lcs_with(const Pattern *pattern, Text b) {
    uint64_t state = ~0ULL;
    for (Py_ssize_t j = 0; j < b.length; j++) {
        Py_UCS4 c = CHAR(b, j);
        uint64_t matches = 0;
        if (c < 256) {
            matches = pattern->table[c];
        } else {
            for (int k = 0; k < pattern->wide_count; k++)
                if (pattern->wide[k] == c) matches = pattern->wide_bits[k];
        }
        uint64_t u = state & matches;
        state = (state + u) | (state - u);
    }
    uint64_t used = pattern->length == 64 ? ~0ULL : ((1ULL << pattern->length) - 1);
    return (Py_ssize_t)__builtin_popcountll(~state & used);
}

/* fuzz.ratio's arithmetic, operation for operation, so the doubles are bit-identical. */
static double ratio_from_lcs(Py_ssize_t total, Py_ssize_t lcs) {
    if (total == 0) return 100.0;
    double distance = (double)(total - 2 * lcs);
    return (1.0 - distance / (double)total) * 100.0;
}

/* fuzz.ratio(a, b), bit for bit: rapidfuzz itself when both texts are longer than 64
 * characters. -1 with an exception set on error. */
static double ratio_of(Text a, Text b, PyObject *a_object, PyObject *b_object) {
    if (a.length > 64 && b.length > 64) {
        PyObject *ratio = PyObject_CallFunctionObjArgs(rapidfuzz_ratio, a_object, b_object, NULL);
        if (ratio == NULL) return -1.0;
        double value = PyFloat_AsDouble(ratio);
        Py_DECREF(ratio);
        return value;
    }
    Pattern pattern;
    pattern_of(a.length <= b.length ? a : b, &pattern);
    return ratio_from_lcs(a.length + b.length, lcs_with(&pattern, a.length <= b.length ? b : a));
}

/* _edit_hashes: out[0] the text's hash, out[1 + j] that of the text less character j. */
static void hashes_of(Text text, uint32_t *out) {
    uint64_t prefixes[MAX_TEXT], powers[MAX_TEXT], prefix = 0;
    Py_ssize_t n = text.length;
    for (Py_ssize_t j = 0; j < n; j++) {
        prefixes[j] = prefix;
        prefix = prefix * BASE + ((uint64_t)CHAR(text, j) + 1);
    }
    out[0] = (uint32_t)((prefix + (uint64_t)n * LENGTH_MIX) >> 32);
    uint64_t shrunk = prefix + (uint64_t)(n - 1) * LENGTH_MIX, power = 1;
    for (Py_ssize_t j = n - 1; j >= 0; j--) { /* powers[j] = BASE**(n-1-j) */
        powers[j] = power;
        power *= BASE;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        uint64_t code = (uint64_t)CHAR(text, j) + 1;
        out[1 + j] = (uint32_t)((shrunk + (prefixes[j] * (1 - BASE) - code) * powers[j]) >> 32);
    }
}

static PyObject *indel_ratio(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    Text a, b;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "indel_ratio(a, b) takes two strings");
        return NULL;
    }
    if (text_of(args[0], &a) < 0 || text_of(args[1], &b) < 0) return NULL;
    double ratio = ratio_of(a, b, args[0], args[1]);
    if (ratio < 0 && PyErr_Occurred()) return NULL;
    return PyFloat_FromDouble(ratio);
}

static PyObject *edit_hashes(PyObject *module, PyObject *object) {
    Text text;
    uint32_t hashes[MAX_TEXT + 1];
    if (text_of(object, &text) < 0) return NULL;
    if (text.length > MAX_TEXT) {
        PyErr_Format(PyExc_ValueError, "edit_hashes takes at most %d characters", MAX_TEXT);
        return NULL;
    }
    hashes_of(text, hashes);
    PyObject *out = PyList_New(text.length + 1);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i <= text.length; i++) {
        PyObject *hash = PyLong_FromUnsignedLong(hashes[i]);
        if (hash == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, hash);
    }
    return out;
}

static int get_buffer(PyObject *object, Py_buffer *view, const char *name, Py_ssize_t itemsize) {
    if (PyObject_GetBuffer(object, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (itemsize && view->itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: expected %zd-byte items, got %zd", name, itemsize,
                     view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

typedef struct {
    int32_t *ids;
    Py_ssize_t size, capacity;
} Ids;

static int push(Ids *ids, int32_t id) {
    if (ids->size == ids->capacity) {
        Py_ssize_t capacity = ids->capacity ? 2 * ids->capacity : 256;
        int32_t *grown = PyMem_Realloc(ids->ids, (size_t)capacity * sizeof(int32_t));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        ids->ids = grown;
        ids->capacity = capacity;
    }
    ids->ids[ids->size++] = id;
    return 0;
}

static int compare_ids(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* Appends the ids of the values whose hashes meet the text's (with repeats). */
static int probe(Text text, Py_buffer *hashes, Py_buffer *starts, Py_buffer *value_ids,
                 unsigned shift, Ids *found) {
    uint32_t codes[MAX_TEXT + 1];
    const uint32_t *table = hashes->buf;
    const int32_t *ids = value_ids->buf;
    Py_ssize_t buckets = starts->len / starts->itemsize - 1;
    hashes_of(text, codes);
    for (Py_ssize_t h = 0; h <= text.length; h++) {
        Py_ssize_t bucket = (Py_ssize_t)(codes[h] >> shift), first, last;
        if (bucket >= buckets) {
            PyErr_SetString(PyExc_ValueError, "edit index: bucket out of range");
            return -1;
        }
        if (starts->itemsize == 4) {
            first = ((const int32_t *)starts->buf)[bucket];
            last = ((const int32_t *)starts->buf)[bucket + 1];
        } else {
            first = ((const int64_t *)starts->buf)[bucket];
            last = ((const int64_t *)starts->buf)[bucket + 1];
        }
        if (first < 0 || last > hashes->len / 4 || last > value_ids->len / 4) {
            PyErr_SetString(PyExc_ValueError, "edit index: slot out of range");
            return -1;
        }
        for (Py_ssize_t slot = first; slot < last; slot++)
            if (table[slot] == codes[h] && push(found, ids[slot]) < 0) return -1;
    }
    return 0;
}

/* Sorts the ids and drops repeats. */
static void sort_unique(Ids *ids) {
    if (ids->size) qsort(ids->ids, (size_t)ids->size, sizeof(int32_t), compare_ids);
    Py_ssize_t unique = 0;
    for (Py_ssize_t i = 0; i < ids->size; i++)
        if (unique == 0 || ids->ids[i] != ids->ids[unique - 1]) ids->ids[unique++] = ids->ids[i];
    ids->size = unique;
}

static int push_all(Ids *ids, PyObject *iterable) {
    PyObject *iterator = PyObject_GetIter(iterable), *item;
    if (iterator == NULL) return -1;
    while ((item = PyIter_Next(iterator)) != NULL) {
        long id = PyLong_AsLong(item);
        Py_DECREF(item);
        if ((id == -1 && PyErr_Occurred()) || push(ids, (int32_t)id) < 0) break;
    }
    Py_DECREF(iterator);
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *edit_neighbours(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "edit_neighbours(text, hashes, starts, value_ids, shift, texts, kinds, "
                        "extra) takes 8 arguments");
        return NULL;
    }
    PyObject *texts = args[5], *extra = args[7];
    Text text;
    if (text_of(args[0], &text) < 0) return NULL;
    if (text.length > MAX_TEXT) {
        PyErr_Format(PyExc_ValueError, "edit_neighbours takes at most %d characters", MAX_TEXT);
        return NULL;
    }
    long shift = PyLong_AsLong(args[4]);
    if (shift == -1 && PyErr_Occurred()) return NULL;
    if (shift < 1 || shift > 31) {
        PyErr_SetString(PyExc_ValueError, "shift must be 1-31");
        return NULL;
    }
    if (!PyList_Check(texts) && !PyTuple_Check(texts)) {
        PyErr_SetString(PyExc_TypeError, "texts must be a list or a tuple");
        return NULL;
    }

    Py_buffer hashes, starts, value_ids, kinds;
    Ids found = {NULL, 0, 0};
    PyObject *out = NULL;
    int held = 0; /* buffers acquired */
    if (get_buffer(args[1], &hashes, "hashes", 4) < 0) goto done;
    held = 1;
    if (get_buffer(args[2], &starts, "starts", 0) < 0) goto done;
    held = 2;
    if (starts.itemsize != 4 && starts.itemsize != 8) {
        PyErr_SetString(PyExc_TypeError, "starts: expected 4- or 8-byte items");
        goto done;
    }
    if (get_buffer(args[3], &value_ids, "value_ids", 4) < 0) goto done;
    held = 3;
    if (get_buffer(args[6], &kinds, "kinds", 1) < 0) goto done;
    held = 4;

    if (probe(text, &hashes, &starts, &value_ids, (unsigned)shift, &found) < 0) goto done;
    if (extra != Py_None && push_all(&found, extra) < 0) goto done;
    sort_unique(&found);
    Pattern pattern; /* the text's, for every value (values of any length) */
    pattern_of(text, &pattern);
    const unsigned char *kind_of = kinds.buf;
    out = PyDict_New();
    if (out == NULL) goto done;
    for (Py_ssize_t i = 0; i < found.size; i++) {
        Py_ssize_t value_id = found.ids[i];
        if (value_id < 0 || value_id >= kinds.len || value_id >= PySequence_Fast_GET_SIZE(texts)) {
            PyErr_SetString(PyExc_IndexError, "edit index: value id out of range");
            goto fail;
        }
        if (kind_of[value_id] == KIND_EXACT_ONLY) continue;
        Text value;
        if (text_of(PySequence_Fast_GET_ITEM(texts, value_id), &value) < 0) goto fail;
        double ratio = ratio_from_lcs(text.length + value.length, lcs_with(&pattern, value));
        PyObject *id = PyLong_FromSsize_t(value_id), *score = PyFloat_FromDouble(ratio);
        int status = id == NULL || score == NULL ? -1 : PyDict_SetItem(out, id, score);
        Py_XDECREF(id);
        Py_XDECREF(score);
        if (status < 0) goto fail;
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    PyMem_Free(found.ids);
    if (held >= 4) PyBuffer_Release(&kinds);
    if (held >= 3) PyBuffer_Release(&value_ids);
    if (held >= 2) PyBuffer_Release(&starts);
    if (held >= 1) PyBuffer_Release(&hashes);
    return out;
}

/* tool_cache._number_similarity: 100 * max(0, 1 - |a-b| / max(|a|, |b|)), 100 when equal, 0 when
 * not finite; Python's max keeps its first argument unless a later one is greater. */
static double number_similarity(double a, double b) {
    if (a == b) return 100.0;
    double scale = fabs(b) > fabs(a) ? fabs(b) : fabs(a);
    double closeness = 1.0 - fabs(a - b) / scale;
    double similarity = 100.0 * (closeness > 0.0 ? closeness : 0.0);
    return isfinite(similarity) ? similarity : 0.0;
}

/* One argument of best_entry: the column's arrays and the query's value. */
typedef struct {
    Py_buffer value_ids, kinds, numbers;
    int held; /* buffers acquired */
    PyObject *memo, *texts, *query_text;
    Text text;
    int kind;
    double number;
} Argument;

static void release_arguments(Argument *arguments, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        if (arguments[i].held >= 3) PyBuffer_Release(&arguments[i].numbers);
        if (arguments[i].held >= 2) PyBuffer_Release(&arguments[i].kinds);
        if (arguments[i].held >= 1) PyBuffer_Release(&arguments[i].value_ids);
    }
    PyMem_Free(arguments);
}

/* Reads (entry_value_ids, memo, kinds, texts, numbers, query) into `argument`. */
static int read_argument(PyObject *spec, Argument *argument) {
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "each column is (entry_value_ids, memo, kinds, texts, numbers, query)");
        return -1;
    }
    if (get_buffer(PyTuple_GET_ITEM(spec, 0), &argument->value_ids, "entry_value_ids", 4) < 0)
        return -1;
    argument->held = 1;
    if (get_buffer(PyTuple_GET_ITEM(spec, 2), &argument->kinds, "kinds", 1) < 0) return -1;
    argument->held = 2;
    if (get_buffer(PyTuple_GET_ITEM(spec, 4), &argument->numbers, "numbers", 8) < 0) return -1;
    argument->held = 3;
    argument->memo = PyTuple_GET_ITEM(spec, 1);
    argument->texts = PyTuple_GET_ITEM(spec, 3);
    PyObject *query = PyTuple_GET_ITEM(spec, 5);
    if (!PyDict_Check(argument->memo) ||
        !(PyList_Check(argument->texts) || PyTuple_Check(argument->texts)) ||
        !PyTuple_Check(query) || PyTuple_GET_SIZE(query) != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "memo must be a dict, texts a list or tuple, query a 4-tuple");
        return -1;
    }
    argument->kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(query, 1));
    argument->query_text = PyTuple_GET_ITEM(query, 2);
    argument->number = PyFloat_AsDouble(PyTuple_GET_ITEM(query, 3));
    if (PyErr_Occurred()) return -1;
    return text_of(argument->query_text, &argument->text);
}

/* _Column.similarity(query, value_id) for a value that is not the query's own. */
static double similarity_of(Argument *argument, Py_ssize_t value_id) {
    if (value_id >= argument->kinds.len || value_id >= PySequence_Fast_GET_SIZE(argument->texts) ||
        value_id >= argument->numbers.len / 8) {
        PyErr_SetString(PyExc_IndexError, "value id out of range");
        return -1.0;
    }
    int value_kind = ((const unsigned char *)argument->kinds.buf)[value_id];
    if (argument->kind == KIND_NUMBER && value_kind == KIND_NUMBER)
        return number_similarity(argument->number,
                                 ((const double *)argument->numbers.buf)[value_id]);
    if (argument->kind == KIND_EXACT_ONLY || value_kind == KIND_EXACT_ONLY) return 0.0;
    PyObject *value_object = PySequence_Fast_GET_ITEM(argument->texts, value_id);
    Text value;
    if (text_of(value_object, &value) < 0) return -1.0;
    return ratio_of(argument->text, value, argument->query_text, value_object);
}

/* Summed similarity of one entry; similarities come from, or go to, each argument's memo. */
static int entry_total(Argument *arguments, Py_ssize_t count, Py_ssize_t local_id, double *total) {
    *total = 0.0;
    for (Py_ssize_t i = 0; i < count; i++) {
        Argument *argument = &arguments[i];
        if (local_id >= argument->value_ids.len / 4) {
            PyErr_SetString(PyExc_IndexError, "local id out of range");
            return -1;
        }
        Py_ssize_t value_id = ((const int32_t *)argument->value_ids.buf)[local_id];
        PyObject *key = PyLong_FromSsize_t(value_id);
        if (key == NULL) return -1;
        PyObject *known = PyDict_GetItemWithError(argument->memo, key); /* borrowed */
        double similarity;
        if (known != NULL) {
            similarity = PyFloat_AsDouble(known);
        } else if (!PyErr_Occurred()) {
            similarity = similarity_of(argument, value_id);
            if (!(similarity < 0 && PyErr_Occurred())) {
                PyObject *value = PyFloat_FromDouble(similarity);
                if (value == NULL || PyDict_SetItem(argument->memo, key, value) < 0)
                    similarity = -1.0;
                Py_XDECREF(value);
            }
        } else {
            similarity = -1.0;
        }
        Py_DECREF(key);
        if (similarity < 0 && PyErr_Occurred()) return -1;
        *total += similarity;
    }
    return 0;
}

static PyObject *best_entry(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "best_entry(local_ids, columns: list) takes 2 arguments");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(args[1]);
    Argument *arguments = PyMem_Calloc(count ? (size_t)count : 1, sizeof(Argument));
    if (arguments == NULL) return PyErr_NoMemory();
    PyObject *iterator = NULL, *item, *out = NULL;
    for (Py_ssize_t i = 0; i < count; i++)
        if (read_argument(PyList_GET_ITEM(args[1], i), &arguments[i]) < 0) goto done;
    iterator = PyObject_GetIter(args[0]);
    if (iterator == NULL) goto done;
    double best_total = -1.0, total;
    Py_ssize_t best_id = 0;
    while ((item = PyIter_Next(iterator)) != NULL) {
        Py_ssize_t local_id = PyLong_AsSsize_t(item);
        Py_DECREF(item);
        if (local_id < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_IndexError, "negative local id");
            goto done;
        }
        if (entry_total(arguments, count, local_id, &total) < 0) goto done;
        if (total > best_total) {
            best_total = total;
            best_id = local_id;
        }
    }
    if (!PyErr_Occurred()) out = Py_BuildValue("(dn)", best_total, best_id);
done:
    Py_XDECREF(iterator);
    release_arguments(arguments, count);
    return out;
}

/* Appends the local ids of the entries holding `value_id`: its group of post_ids (starts are
 * int64) and its list in the tail dict, as _Column.postings reads them. */
static int push_postings(Ids *ids, Py_ssize_t value_id, Py_buffer *post_ids, Py_buffer *starts,
                         PyObject *tail, PyObject *key) {
    const int64_t *start = starts->buf;
    Py_ssize_t groups = starts->len / 8 - 1;
    if (value_id < groups) {
        if (start[value_id] < 0 || start[value_id + 1] > post_ids->len / 4) {
            PyErr_SetString(PyExc_IndexError, "postings out of range");
            return -1;
        }
        for (int64_t slot = start[value_id]; slot < start[value_id + 1]; slot++)
            if (push(ids, ((const int32_t *)post_ids->buf)[slot]) < 0) return -1;
    }
    PyObject *later = PyDict_GetItemWithError(tail, key); /* borrowed */
    if (later == NULL) return PyErr_Occurred() ? -1 : 0;
    if (!PyList_Check(later)) {
        PyErr_SetString(PyExc_TypeError, "post_tail values must be lists");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(later); i++) {
        long id = PyLong_AsLong(PyList_GET_ITEM(later, i));
        if (id == -1 && PyErr_Occurred()) return -1;
        if (push(ids, (int32_t)id) < 0) return -1;
    }
    return 0;
}

/* One (found, bound, post_ids, post_starts, post_tail) of gather_postings. */
static int gather_one(PyObject *spec, Ids *ids) {
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 5 ||
        !PyDict_Check(PyTuple_GET_ITEM(spec, 0)) || !PyDict_Check(PyTuple_GET_ITEM(spec, 4))) {
        PyErr_SetString(PyExc_TypeError,
                        "each list is (found: dict, bound, post_ids, post_starts, "
                        "post_tail: dict)");
        return -1;
    }
    PyObject *found = PyTuple_GET_ITEM(spec, 0), *tail = PyTuple_GET_ITEM(spec, 4);
    double bound = PyFloat_AsDouble(PyTuple_GET_ITEM(spec, 1));
    if (bound == -1.0 && PyErr_Occurred()) return -1;
    Py_buffer post_ids, starts;
    if (get_buffer(PyTuple_GET_ITEM(spec, 2), &post_ids, "post_ids", 4) < 0) return -1;
    if (get_buffer(PyTuple_GET_ITEM(spec, 3), &starts, "post_starts", 8) < 0) {
        PyBuffer_Release(&post_ids);
        return -1;
    }
    int status = 0;
    Py_ssize_t position = 0;
    PyObject *key, *value;
    while (status == 0 && PyDict_Next(found, &position, &key, &value)) {
        double similarity = PyFloat_AsDouble(value);
        Py_ssize_t value_id = PyLong_AsSsize_t(key);
        if (PyErr_Occurred()) {
            status = -1;
        } else if (value_id < 0) {
            PyErr_SetString(PyExc_IndexError, "negative value id");
            status = -1;
        } else if (similarity > bound) { /* the others count no more than the bound */
            status = push_postings(ids, value_id, &post_ids, &starts, tail, key);
        }
    }
    PyBuffer_Release(&starts);
    PyBuffer_Release(&post_ids);
    return status;
}

static PyObject *gather_postings(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "gather_postings(lists: list, budget) takes 2 arguments");
        return NULL;
    }
    Py_ssize_t budget = PyLong_AsSsize_t(args[1]);
    if (budget == -1 && PyErr_Occurred()) return NULL;
    Ids ids = {NULL, 0, 0};
    PyObject *out = NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(args[0]); i++)
        if (gather_one(PyList_GET_ITEM(args[0], i), &ids) < 0) goto done;
    sort_unique(&ids);
    Py_ssize_t unique = ids.size;
    if (unique > budget) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    out = PyList_New(unique);
    if (out == NULL) goto done;
    for (Py_ssize_t i = 0; i < unique; i++) {
        PyObject *id = PyLong_FromLong(ids.ids[i]);
        if (id == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, id);
    }
done:
    PyMem_Free(ids.ids);
    return out;
}

/* --- canonical arguments ------------------------------------------------------------------ */

/* What str.split() splits ASCII text on. */
static int is_ascii_space(Py_UCS1 c) {
    return c == ' ' || (c >= 9 && c <= 13) || (c >= 28 && c <= 31);
}

/* normalise_string for ASCII text: whitespace runs become one space, ends trimmed. */
static PyObject *collapse_ascii(PyObject *text) {
    const Py_UCS1 *in = PyUnicode_1BYTE_DATA(text);
    Py_ssize_t length = PyUnicode_GET_LENGTH(text), size = 0;
    char small[256], *out = length <= 256 ? small : PyMem_Malloc((size_t)length);
    if (out == NULL) return PyErr_NoMemory();
    int space = 0; /* a run of whitespace since the last text */
    for (Py_ssize_t i = 0; i < length; i++) {
        if (is_ascii_space(in[i])) {
            space = size > 0;
            continue;
        }
        if (space) out[size++] = ' ';
        space = 0;
        out[size++] = (char)in[i];
    }
    PyObject *result = PyUnicode_FromStringAndSize(out, size);
    if (out != small) PyMem_Free(out);
    return result;
}

typedef struct {
    char *data;
    Py_ssize_t size, capacity;
} Buffer;

static int append(Buffer *buffer, const char *data, Py_ssize_t size) {
    if (buffer->size + size > buffer->capacity) {
        Py_ssize_t capacity = 2 * (buffer->size + size) + 64;
        char *grown = PyMem_Realloc(buffer->data, (size_t)capacity);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        buffer->data = grown;
        buffer->capacity = capacity;
    }
    memcpy(buffer->data + buffer->size, data, (size_t)size);
    buffer->size += size;
    return 0;
}

/* Appends an ASCII str object's text as it is. */
static int append_str(Buffer *buffer, PyObject *text) {
    return append(buffer, (const char *)PyUnicode_1BYTE_DATA(text), PyUnicode_GET_LENGTH(text));
}

/* json's encode_basestring_ascii: ASCII text in C, other text through `escape`. */
static int append_escaped(Buffer *buffer, PyObject *text, PyObject *escape) {
    if (!PyUnicode_IS_ASCII(text)) {
        PyObject *escaped = PyObject_CallOneArg(escape, text);
        if (escaped == NULL) return -1;
        int status = PyUnicode_IS_ASCII(escaped) ? append_str(buffer, escaped) : -1;
        if (status < 0 && !PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "escape must return ASCII");
        Py_DECREF(escaped);
        return status;
    }
    const Py_UCS1 *in = PyUnicode_1BYTE_DATA(text);
    if (append(buffer, "\"", 1) < 0) return -1;
    for (Py_ssize_t i = 0; i < PyUnicode_GET_LENGTH(text); i++) {
        Py_UCS1 c = in[i];
        char escaped[8];
        int size = 2;
        escaped[0] = '\\';
        switch (c) {
        case '"': escaped[1] = '"'; break;
        case '\\': escaped[1] = '\\'; break;
        case '\n': escaped[1] = 'n'; break;
        case '\r': escaped[1] = 'r'; break;
        case '\t': escaped[1] = 't'; break;
        case '\b': escaped[1] = 'b'; break;
        case '\f': escaped[1] = 'f'; break;
        default:
            if (c >= ' ' && c <= '~') {
                escaped[0] = (char)c;
                size = 1;
            } else {
                size = snprintf(escaped, sizeof escaped, "\\u%04x", c);
            }
        }
        if (append(buffer, escaped, size) < 0) return -1;
    }
    return append(buffer, "\"", 1);
}

/* Appends repr(value) (ASCII for ints and floats). */
static int append_repr(Buffer *buffer, PyObject *value) {
    PyObject *text = PyObject_Repr(value);
    if (text == NULL) return -1;
    int status = append_str(buffer, text);
    Py_DECREF(text);
    return status;
}

/* canonical_value of a flat argument value, or NULL without an exception for what only the
 * Python code handles (nested values, subclasses, floats that are not finite). */
static PyObject *canonical_flat_value(PyObject *value, PyObject *normalise) {
    if (PyUnicode_CheckExact(value)) {
        if (PyUnicode_IS_ASCII(value)) return collapse_ascii(value);
        return PyObject_CallOneArg(normalise, value);
    }
    if (PyLong_CheckExact(value) || PyBool_Check(value) || value == Py_None)
        return Py_NewRef(value);
    if (PyFloat_CheckExact(value)) {
        double number = PyFloat_AS_DOUBLE(value);
        if (!isfinite(number)) return NULL;
        if (floor(number) == number) return PyLong_FromDouble(number); /* 1.0 -> 1, -0.0 -> 0 */
        return Py_NewRef(value);
    }
    return NULL;
}

/* The key text of one canonical value, as _dumps_canonical writes it. */
static int append_value(Buffer *buffer, PyObject *value, PyObject *escape) {
    if (PyUnicode_CheckExact(value)) return append_escaped(buffer, value, escape);
    if (value == Py_None) return append(buffer, "null", 4);
    if (value == Py_True) return append(buffer, "true", 4);
    if (value == Py_False) return append(buffer, "false", 5);
    return append_repr(buffer, value); /* an int or a finite float */
}

static PyObject *canonical_arguments(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyDict_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "canonical_arguments(arguments: dict, normalise, escape) takes 3 "
                        "arguments");
        return NULL;
    }
    PyObject *arguments = args[0], *normalise = args[1], *escape = args[2];
    PyObject *canonical = PyDict_New(), *names = NULL, *out = NULL;
    Buffer buffer = {NULL, 0, 0};
    if (canonical == NULL) return NULL;
    Py_ssize_t position = 0;
    PyObject *name, *value;
    while (PyDict_Next(arguments, &position, &name, &value)) {
        if (!PyUnicode_CheckExact(name)) goto fallback;
        PyObject *clean = canonical_flat_value(value, normalise);
        if (clean == NULL) {
            if (PyErr_Occurred()) goto done;
            goto fallback;
        }
        int status = PyDict_SetItem(canonical, name, clean);
        Py_DECREF(clean);
        if (status < 0) goto done;
    }
    names = PyDict_Keys(canonical);
    if (names == NULL || PyList_Sort(names) < 0) goto done;
    if (append(&buffer, "{", 1) < 0) goto done;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(names); i++) {
        PyObject *key = PyList_GET_ITEM(names, i);
        if ((i && append(&buffer, ",", 1) < 0) || append_escaped(&buffer, key, escape) < 0 ||
            append(&buffer, ":", 1) < 0 ||
            append_value(&buffer, PyDict_GetItem(canonical, key), escape) < 0)
            goto done;
    }
    if (append(&buffer, "}", 1) < 0) goto done;
    PyObject *key = PyUnicode_DecodeASCII(buffer.data, buffer.size, "strict");
    if (key == NULL) goto done;
    out = PyTuple_Pack(2, canonical, key);
    Py_DECREF(key);
    goto done;
fallback:
    out = Py_NewRef(Py_None);
done:
    PyMem_Free(buffer.data);
    Py_XDECREF(names);
    Py_DECREF(canonical);
    return out;
}

static PyMethodDef methods[] = {
    {"indel_ratio", (PyCFunction)(void (*)(void))indel_ratio, METH_FASTCALL,
     "indel_ratio(a, b) -> float: rapidfuzz's fuzz.ratio of two strings, bit for bit."},
    {"edit_hashes", edit_hashes, METH_O,
     "edit_hashes(text) -> list[int]: tool_cache._edit_hashes of a text of up to 64 characters."},
    {"edit_neighbours", (PyCFunction)(void (*)(void))edit_neighbours, METH_FASTCALL,
     "edit_neighbours(text, hashes, starts, value_ids, shift, texts, kinds, extra) -> dict: "
     "{value id: fuzz.ratio(text, texts[id])} of the values an _EditIndex's hashes meet, plus "
     "the ids in `extra` (None or an iterable), leaving out booleans and null; ids ascending."},
    {"best_entry", (PyCFunction)(void (*)(void))best_entry, METH_FASTCALL,
     "best_entry(local_ids, columns) -> (summed similarity, local id): _Block._best's loop; each "
     "column is (entry_value_ids, memo, kinds, texts, numbers, query), memo {value id: "
     "similarity} read and filled; the first entry wins ties; (-1.0, 0) for no entries."},
    {"gather_postings", (PyCFunction)(void (*)(void))gather_postings, METH_FASTCALL,
     "gather_postings(lists, budget) -> list | None: the ascending distinct local ids of the "
     "entries holding a value of `found` more similar than `bound`, for each (found, bound, "
     "post_ids, post_starts, post_tail) of `lists`; None when there are more than `budget`."},
    {"canonical_arguments", (PyCFunction)(void (*)(void))canonical_arguments, METH_FASTCALL,
     "canonical_arguments(arguments, normalise, escape) -> (dict, key) | None: "
     "tool_cache.canonical_arguments of a dict of str names and flat values (str, int, finite "
     "float, bool, None); None for anything else, which the Python code handles. `normalise` "
     "and `escape` are called for text that is not ASCII."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "_fuzzy_kernels",
    "Compiled inner loops of the tool cache's fuzzy search; see tool_cache.py.", -1, methods,
};

PyMODINIT_FUNC PyInit__fuzzy_kernels(void) {
    PyObject *fuzz = PyImport_ImportModule("rapidfuzz.fuzz");
    if (fuzz == NULL) return NULL;
    rapidfuzz_ratio = PyObject_GetAttrString(fuzz, "ratio");
    Py_DECREF(fuzz);
    if (rapidfuzz_ratio == NULL) return NULL;
    PyObject *module = PyModule_Create(&module_definition);
    if (module != NULL && PyModule_AddIntConstant(module, "MAX_TEXT", MAX_TEXT) < 0)
        Py_CLEAR(module);
    return module;
}
