"""Task data: reading, tokenizing and caching (data/prepare.py; the GLUE files: data/glue.py);
prepared tensors land in data/cache/.

    python -m data.prepare --task rotten-tomatoes --tokenizer PATH/tokenizer.json
"""
