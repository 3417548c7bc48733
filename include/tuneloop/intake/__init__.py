"""Data intake: every labelled line ends up accepted or quarantined with a reason.

``rows`` (per-line checks: encoding, JSON, the task's format and answer), ``checks`` (LLM
checks: tokens, chat template, PII, label agreement, near-duplicates, eval leakage), ``similarity``
(MinHash/LSH behind the last two), ``expectations`` (the Great Expectations suite and the
batch thresholds), ``pull`` (date partitions in, a content-addressed snapshot out)."""
