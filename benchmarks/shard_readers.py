"""Which library reads WebDataset-layout tar shards (issue 30's choice, docs/DECISIONS.md).

    python benchmarks/shard_readers.py [--samples 4000] [--large-samples 400] [--repeats 3]

Two shard sets in one temporary directory, both in the WebDataset layout (one sample = a
``<key>.json`` and its image members, consecutive in the tar): "small" (the synthetic task's
28x28 PNGs, ~150 bytes each: per-member overhead dominates) and "large" (100 KB members: bytes
dominate). Each reader yields every sample as a dict of raw bytes (no decoding, which costs
the same whoever reads the tar), from local files and over HTTP from a Python
``http.server`` on 127.0.0.1:

* ``stdlib``: ``tarfile`` in stream mode (``r|``) over ``open()`` / ``urllib`` responses;
* ``webdataset``: ``webdataset.WebDataset(urls, shardshuffle=False)`` (over HTTP it pipes
  ``curl``, its default opener for http(s));
* ``datasets``: ``load_dataset("webdataset", data_files=..., streaming=True)`` (local only:
  its HTTP path needs ``aiohttp``, not installed here).

A reader that is not installed is reported as such. Prints samples/s (median of the repeats)
and a JSON line.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import os
import statistics
import tarfile
import tempfile
import threading
import time
import urllib.request
from typing import Callable, Dict, Iterator, List

SAMPLES_PER_SHARD = 500


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _write_shards(out: str, samples: int, member_bytes: Callable[[int, int], bytes], members: int) -> List[str]:
    names = []
    for start in range(0, samples, SAMPLES_PER_SHARD):
        name = os.path.join(out, f"train-{len(names):05d}.tar")
        with tarfile.open(name, "w") as tar:
            for i in range(start, min(samples, start + SAMPLES_PER_SHARD)):
                key = f"{i:010d}"
                doc = json.dumps({"fields": {"qry": "<|image_1|>\nFind a caption for this image.",
                                             "pos_text": "two red circles on the left"}}).encode()
                parts = [("json", doc)] + [(f"m{j}.png", member_bytes(i, j)) for j in range(members)]
                for suffix, data in parts:
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        names.append(name)
    return names


def _group(tar: tarfile.TarFile) -> Iterator[Dict[str, bytes]]:
    sample: Dict[str, bytes] = {}
    key = None
    for member in tar:
        if not member.isfile():
            continue
        k, _, suffix = member.name.partition(".")
        if k != key and sample:
            yield sample
            sample = {}
        key = k
        sample[suffix] = tar.extractfile(member).read()
    if sample:
        yield sample


def read_stdlib(urls: List[str]) -> Iterator[Dict[str, bytes]]:
    for url in urls:
        stream = urllib.request.urlopen(url, timeout=30) if url.startswith("http") else open(url, "rb")
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            yield from _group(tar)


def read_webdataset(urls: List[str]):
    import webdataset as wds
    return iter(wds.WebDataset(urls, shardshuffle=False))


def read_datasets(urls: List[str]):
    import datasets
    ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", streaming=True)
    return iter(ds.decode(False) if hasattr(ds, "decode") else ds)


def _time(read: Callable[[List[str]], Iterator], urls: List[str], expected: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(1 for _ in read(urls))
        elapsed = time.perf_counter() - start
        if n != expected:
            raise RuntimeError(f"{read.__name__}: {n} samples, expected {expected}")
        rates.append(n / elapsed)
    return statistics.median(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--large-samples", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from llave_ds.toy.synthetic import SceneSpec, render_scene
    png = io.BytesIO()
    render_scene(SceneSpec(count=2, colour="red", shape="circle", position="left")).save(png, format="PNG")
    small = png.getvalue()
    results: Dict[str, Dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {}
        for set_name, n, member in (("small", args.samples, lambda i, j: small),
                                    ("large", args.large_samples, lambda i, j: os.urandom(100_000))):
            os.makedirs(os.path.join(tmp, set_name))
            sets[set_name] = (_write_shards(os.path.join(tmp, set_name), n, member, 2), n)
        handler = functools.partial(_QuietHandler, directory=tmp)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            for set_name, (files, n) in sets.items():
                mb = sum(os.path.getsize(f) for f in files) / 1e6
                http_urls = [f"{base}/{os.path.relpath(f, tmp)}" for f in files]
                row: Dict[str, object] = {"samples": n, "MB": round(mb, 1), "shards": len(files)}
                for reader_name, read, remote in (("stdlib", read_stdlib, True), ("webdataset", read_webdataset, True),
                                                  ("datasets", read_datasets, False)):
                    for where, urls in (("local", files), ("http", http_urls)):
                        if where == "http" and not remote:
                            continue
                        try:
                            row[f"{reader_name}_{where}"] = round(_time(read, urls, n, args.repeats))
                        except ImportError as exc:
                            row[f"{reader_name}_{where}"] = f"not installed ({exc.name})"
                results[set_name] = row
                print(set_name, row, flush=True)
        finally:
            server.shutdown()
            server.server_close()
    print(json.dumps({"shard_readers": results, "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
