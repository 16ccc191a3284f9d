"""Search: find a person from a description in a gallery (index stage, CLI, local web page).

gallery.py  the gallery table; images from data/prepared shards or a folder; its digest and stats
embed.py    the model, its digest and stats; gallery embeddings (streamed, DataLoader workers), queries
index.py    exact and FAISS HNSW indexes, written and loaded as one folder, checked against model and gallery
build.py    the `index@<variant>` stage's work
query.py    `Searcher`: answers, the CLI's table and picture
serve.py    the local web page
command.py  `python -m pipeline search` / `serve`
"""
