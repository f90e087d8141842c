"""The on-disk store: stable hashes for cache keys, atomic and checksummed files, locks, the teacher-logit files
and the top-k teacher stores of causal LMs (:mod:`kdkit.store.topk`). Everything kdkit reuses between runs is
written and verified here."""
