"""The results contract and where it lives: :mod:`.schema` (every file a run writes, typed),
:mod:`.store` (atomic writes, checksummed cache entries, locks), :mod:`.index` (completed points)
and :mod:`.story` (the run's headline numbers, read from the schema)."""
