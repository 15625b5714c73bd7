"""Search sizes of the fuzzy index. The index modules read them as `limits.NAME` when they run,
so a test can shrink them to drive every search step on a small cache."""

# Blocks this small are scored whole (the exact nearest entry).
FULL_SCORE_MAX_ENTRIES = 32
# String vocabularies up to this size are compared whole; larger ones go through a trigram index
# and an index of one-character deletions (`neighbours.EditIndex`).
SMALL_VOCABULARY = 1024
EDIT_MAX_LENGTH = 64  # longer strings are left out of the deletion index (it grows with length)
NEAR_VALUES = 8  # nearest distinct values kept per argument
POSTINGS_BUDGET = 1024  # entries gathered as candidates per lookup, rarest values first
GRAM_POSTINGS_BUDGET = 8192  # trigram postings read per string value, rarest trigrams first
RESCORE_CANDIDATES = 64  # candidates scored exactly after ranking by a partial score
FEW_SHARING = 4  # entries sharing the query's rarest recorded value, scored first
SHORTCUT_ENTRIES = 512  # entries sharing the rarest recorded value, scored when no proof is found
VECTORISE_ABOVE = 24  # candidates scored with numpy rather than plain Python
LOOP_RATIOS = 12  # strings compared by a Python loop over fuzz.ratio rather than one cdist
NEIGHBOUR_SLACK = 1.0  # how far below their bound step 2's neighbours still stand for near values
REBUILD_AFTER = 1024  # values added since an index was built before it is rebuilt
