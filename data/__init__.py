"""Task data: one file per dataset, each defining a `data.task.Task` record (data/rotten_tomatoes.py,
data/glue.py); data/prepare.py holds the registry `TASKS`, tokenisation (with models/tokenizer.py),
the cache of prepared tensors ($INILORA_CACHE/data, else ~/.cache/inilora/data) and batching (`pad_batch`).

    python data/prepare.py --task rotten-tomatoes      (or: python -m data.prepare --task rotten-tomatoes)
"""
