"""The IPS algorithm without learning: exact streaming top-M selection with a per-chunk observer hook
(`selection`), stacking selections into a batch (`batch`), and the novelty score (`novelty`)."""
