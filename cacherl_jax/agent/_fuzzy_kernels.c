/* Compiled inner loops of the tool cache's fuzzy search (cacherl_jax/agent/tool_cache.py).
 *
 * The search's per-lookup work is a few dozen small steps; in CPython each costs about a
 * microsecond, which made the one-edit neighbour search most of a perturbed call's lookup. These
 * kernels do the same steps in C, with results identical to the Python code they replace (which
 * stays as the reference and the fallback when this module is not built):
 *
 *   indel_ratio(a, b)   rapidfuzz's fuzz.ratio: 100 * (1 - Indel distance / (len a + len b)).
 *   edit_hashes(text)   tool_cache._edit_hashes: the text's hash, then each one-deletion's.
 *   edit_neighbours(text, hashes, starts, value_ids, shift, texts, kinds, extra)
 *                       _EditIndex.neighbours + the ratio loop of _Column.edit_neighbours:
 *                       {value id: ratio} of every value whose hashes meet the text's.
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

/* Length of the longest common subsequence of two texts, the shorter of at most 64 characters:
 * bit-parallel (Allison-Dix, Hyyro), one 64-bit word of match bits per character. */
static Py_ssize_t lcs_length(Text a, Text b) {
    uint64_t table[256] = {0}; /* match bits of characters below 256 */
    Py_UCS4 wide[64];         /* the others, with theirs */
    uint64_t wide_bits[64];
    int wide_count = 0;
    for (Py_ssize_t i = 0; i < a.length; i++) {
        Py_UCS4 c = CHAR(a, i);
        if (c < 256) {
            table[c] |= 1ULL << i;
            continue;
        }
        int k = 0;
        while (k < wide_count && wide[k] != c) k++;
        if (k == wide_count) {
            wide[k] = c;
            wide_bits[k] = 0;
            wide_count++;
        }
        wide_bits[k] |= 1ULL << i;
    }
    uint64_t state = ~0ULL;
    for (Py_ssize_t j = 0; j < b.length; j++) {
        Py_UCS4 c = CHAR(b, j);
        uint64_t matches = 0;
        if (c < 256) {
            matches = table[c];
        } else {
            for (int k = 0; k < wide_count; k++)
                if (wide[k] == c) matches = wide_bits[k];
        }
        uint64_t u = state & matches;
        state = (state + u) | (state - u);
    }
    uint64_t used = a.length == 64 ? ~0ULL : ((1ULL << a.length) - 1);
    return (Py_ssize_t)__builtin_popcountll(~state & used);
}

/* fuzz.ratio(a, b): its arithmetic operation for operation, so the doubles are bit-identical;
 * rapidfuzz itself when both texts are longer than 64 characters. -1 with an exception set on
 * error. */
static double ratio_of(Text a, Text b, PyObject *a_object, PyObject *b_object) {
    Py_ssize_t total = a.length + b.length;
    if (total == 0) return 100.0;
    if (a.length > 64 && b.length > 64) {
        PyObject *ratio = PyObject_CallFunctionObjArgs(rapidfuzz_ratio, a_object, b_object, NULL);
        if (ratio == NULL) return -1.0;
        double value = PyFloat_AsDouble(ratio);
        Py_DECREF(ratio);
        return value;
    }
    Py_ssize_t lcs = a.length <= b.length ? lcs_length(a, b) : lcs_length(b, a);
    double distance = (double)(total - 2 * lcs);
    return (1.0 - distance / (double)total) * 100.0;
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

/* Adds the ids meeting the text's hashes to `found` (a set, so the caller iterates them in the
 * order the Python code's set would). */
static int probe(Text text, Py_buffer *hashes, Py_buffer *starts, Py_buffer *value_ids,
                 unsigned shift, PyObject *found) {
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
        for (Py_ssize_t slot = first; slot < last; slot++) {
            if (table[slot] != codes[h]) continue;
            PyObject *id = PyLong_FromLong(ids[slot]);
            if (id == NULL || PySet_Add(found, id) < 0) {
                Py_XDECREF(id);
                return -1;
            }
            Py_DECREF(id);
        }
    }
    return 0;
}

static int add_all(PyObject *set, PyObject *iterable) {
    PyObject *iterator = PyObject_GetIter(iterable), *item;
    if (iterator == NULL) return -1;
    while ((item = PyIter_Next(iterator)) != NULL) {
        int status = PySet_Add(set, item);
        Py_DECREF(item);
        if (status < 0) break;
    }
    Py_DECREF(iterator);
    return PyErr_Occurred() ? -1 : 0;
}

/* out[id] = ratio(text, texts[id]) unless the value is a boolean or null. */
static int add_ratio(PyObject *out, PyObject *id, Text text, PyObject *text_object, PyObject *texts,
                     const unsigned char *kind_of, Py_ssize_t kinds) {
    Py_ssize_t value_id = PyLong_AsSsize_t(id);
    if (value_id == -1 && PyErr_Occurred()) return -1;
    if (value_id < 0 || value_id >= kinds || value_id >= PyList_GET_SIZE(texts)) {
        PyErr_SetString(PyExc_IndexError, "edit index: value id out of range");
        return -1;
    }
    if (kind_of[value_id] == KIND_EXACT_ONLY) return 0;
    Text value;
    PyObject *value_object = PyList_GET_ITEM(texts, value_id);
    if (text_of(value_object, &value) < 0) return -1;
    double ratio = ratio_of(text, value, text_object, value_object);
    if (ratio < 0 && PyErr_Occurred()) return -1;
    PyObject *score = PyFloat_FromDouble(ratio);
    if (score == NULL) return -1;
    int status = PyDict_SetItem(out, id, score);
    Py_DECREF(score);
    return status;
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
    if (!PyList_Check(texts)) {
        PyErr_SetString(PyExc_TypeError, "texts must be a list");
        return NULL;
    }

    Py_buffer hashes, starts, value_ids, kinds;
    PyObject *found = NULL, *out = NULL, *iterator = NULL;
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

    found = PySet_New(NULL);
    if (found == NULL) goto done;
    if (probe(text, &hashes, &starts, &value_ids, (unsigned)shift, found) < 0) goto done;
    if (extra != Py_None && add_all(found, extra) < 0) goto done;

    out = PyDict_New();
    iterator = PyObject_GetIter(found); /* the order Python's loop over the set has */
    if (out == NULL || iterator == NULL) goto fail;
    PyObject *id;
    const unsigned char *kind_of = kinds.buf;
    while ((id = PyIter_Next(iterator)) != NULL) {
        int status = add_ratio(out, id, text, args[0], texts, kind_of, kinds.len);
        Py_DECREF(id);
        if (status < 0) goto fail;
    }
    if (PyErr_Occurred()) goto fail;
    goto done;
fail:
    Py_CLEAR(out);
done:
    Py_XDECREF(iterator);
    Py_XDECREF(found);
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
    if (!PyDict_Check(argument->memo) || !PyList_Check(argument->texts) ||
        !PyTuple_Check(query) || PyTuple_GET_SIZE(query) != 4) {
        PyErr_SetString(PyExc_TypeError, "memo must be a dict, texts a list, query a 4-tuple");
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
    if (value_id >= argument->kinds.len || value_id >= PyList_GET_SIZE(argument->texts) ||
        value_id >= argument->numbers.len / 8) {
        PyErr_SetString(PyExc_IndexError, "value id out of range");
        return -1.0;
    }
    int value_kind = ((const unsigned char *)argument->kinds.buf)[value_id];
    if (argument->kind == KIND_NUMBER && value_kind == KIND_NUMBER)
        return number_similarity(argument->number,
                                 ((const double *)argument->numbers.buf)[value_id]);
    if (argument->kind == KIND_EXACT_ONLY || value_kind == KIND_EXACT_ONLY) return 0.0;
    PyObject *value_object = PyList_GET_ITEM(argument->texts, value_id);
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

static PyMethodDef methods[] = {
    {"indel_ratio", (PyCFunction)(void (*)(void))indel_ratio, METH_FASTCALL,
     "indel_ratio(a, b) -> float: rapidfuzz's fuzz.ratio of two strings, bit for bit."},
    {"edit_hashes", edit_hashes, METH_O,
     "edit_hashes(text) -> list[int]: tool_cache._edit_hashes of a text of up to 64 characters."},
    {"edit_neighbours", (PyCFunction)(void (*)(void))edit_neighbours, METH_FASTCALL,
     "edit_neighbours(text, hashes, starts, value_ids, shift, texts, kinds, extra) -> dict: "
     "{value id: fuzz.ratio(text, texts[id])} of the values an _EditIndex's hashes meet, plus "
     "the ids in `extra` (None or an iterable), leaving out booleans and null."},
    {"best_entry", (PyCFunction)(void (*)(void))best_entry, METH_FASTCALL,
     "best_entry(local_ids, columns) -> (summed similarity, local id): _Block._best's loop; each "
     "column is (entry_value_ids, memo, kinds, texts, numbers, query), memo {value id: "
     "similarity} read and filled; the first entry wins ties; (-1.0, 0) for no entries."},
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
    return PyModule_Create(&module_definition);
}
