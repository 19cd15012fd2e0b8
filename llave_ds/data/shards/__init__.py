"""Training rows as tar shards in the WebDataset layout, with an index (docs/DATA.md, "Shards").

``layout``: what a shard and ``index.json`` hold, and where sample i of the global order
lives; ``writer``: any local source -> shards (``llave-ds shard``, ``command``); ``streams``:
shard names and URLs opened as byte streams (local, HTTP with bounded retries, fsspec);
``reader``: shards -> the same row dicts the folder layout yields, with the media bytes.
"""
