"""llave_ds.data.shards: a local source written as WebDataset-layout tar shards with an index, and
read back (locally, over HTTP from a server on 127.0.0.1, through fsspec) as the same rows and
the same media bytes; the faults (404, a stopped server, a cut or stalled connection, corrupt or
missing members, a broken tar, paths leaving the image root) give errors naming what failed."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from llave_ds import cli
from llave_ds.data.errors import DataError
from llave_ds.data.row_files import read_rows, row_files
from llave_ds.data.shards.command import parse_size
from llave_ds.data.shards.layout import INDEX_NAME, ShardIndex, split_member_name
from llave_ds.data.shards.reader import BAD_SAMPLE, ShardReader
from llave_ds.data.shards.streams import RetryPolicy, expand_braces
from llave_ds.data.shards.writer import write_shards
from llave_ds.toy.synthetic import prepare_synthetic_mmeb

FAST = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.02, timeout_s=2.0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    train, images = prepare_synthetic_mmeb(root / "data", num_train_per_subset=12, num_eval_per_subset=2, seed=3)
    out = root / "shards"
    index = write_shards(train, str(out), image_root=images, shard_size=8000)
    return {"train": train, "images": Path(images), "shards": out, "index": index}


def folder_rows(train):
    """(file, row number, row) of every row of the folder layout, in the shards' global order."""
    return [(f, i, row) for f in row_files(train, None, "original") for i, row in enumerate(read_rows(f))]


def copy_shards(synth, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(synth["shards"], out)
    return out


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serve(directory, handler=_Quiet):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def rewrite_tar(path: Path, change):
    """Rewrite ``path`` member by member; ``change(name, data)`` returns new bytes or None (drop)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for m, data in members:
            data = change(m.name, data)
            if data is not None:
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))


# --------------------------------------------------------------------------- round trip

def test_round_trip_equals_the_folder_rows_and_files(synth):
    index = synth["index"]
    rows = folder_rows(synth["train"])
    samples = list(ShardReader(str(synth["shards"])))
    assert len(samples) == len(rows) == index.num_samples == 48
    assert len(index.shards) > 3, "the small shard size must cut several shards"
    media_seen = 0
    for position, (sample, (f, i, row)) in enumerate(zip(samples, rows)):
        assert (sample.fields, sample.subset, sample.file, sample.row) == (row, f.subset, str(f.relative), i)
        assert sample.index == position and sample.key == f"{position:010d}"
        paths = [row.get("qry_image_path"), row.get("pos_image_path")] + list(row.get("neg_image_path") or [])
        paths = [p for p in paths if p]
        assert sorted(sample.media) == sorted(set(paths))
        for path in paths:
            assert sample.media[path] == (synth["images"] / path).read_bytes()
            media_seen += 1
    assert media_seen > 48  # Synth_T2I's negatives are images


def test_the_index_counts_and_checksums(synth):
    index = ShardIndex.loads((synth["shards"] / INDEX_NAME).read_text(), "index.json")
    assert index.num_samples == sum(s.num_samples for s in index.shards) == 48
    tars = sorted(p.name for p in synth["shards"].glob("*.tar"))
    assert tars == [s.name for s in index.shards]
    for info in index.shards:
        data = (synth["shards"] / info.name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (info.bytes, info.sha256)
        with tarfile.open(synth["shards"] / info.name) as tar:
            assert len({split_member_name(m.name)[0] for m in tar}) == info.num_samples
    by_subset = {}
    for f, _, _ in folder_rows(synth["train"]):
        by_subset[f.subset] = by_subset.get(f.subset, 0) + 1
    assert {name: s["end"] - s["start"] for name, s in index.subsets.items()} == by_subset
    assert all(s["rows"] == by_subset[name] and s["skipped"] == {} for name, s in index.subsets.items())


def test_same_input_same_shard_bytes(synth, tmp_path):
    again = write_shards(synth["train"], str(tmp_path / "again"), image_root=str(synth["images"]), shard_size=8000)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in synth["index"].shards]


def test_samples_a_to_b_of_the_global_order(synth):
    reader = ShardReader(str(synth["shards"]))
    everything = list(reader)
    index = reader.index
    for a, b in [(0, 48), (5, 6), (7, 31), (47, 48), (13, 13)]:
        assert [s.key for s in reader.iter_range(a, b)] == [s.key for s in everything[a:b]]
        plan = index.plan(a, b)
        assert sum(p.end - p.start for p in plan) == b - a
    for i in range(48):
        position, offset = index.locate(i)
        assert index.starts[position] + offset == i
        assert everything[i].shard == index.shards[position].name and everything[i].offset == offset
    with pytest.raises(IndexError):
        index.locate(48)
    # A worker's whole shards, in the order given.
    assert [s.key for s in reader.iter_shards([2, 0])] == \
        [s.key for s in everything if s.shard == index.shards[2].name] + \
        [s.key for s in everything if s.shard == index.shards[0].name]


# --------------------------------------------------------------------------- remote

def test_over_http_equals_local(synth):
    local = list(ShardReader(str(synth["shards"])))
    with serve(synth["shards"]) as (_, base):
        remote = list(ShardReader(base + "/", retry=FAST))
        n = len(synth["index"].shards)
        pattern = base + "/train-{00000..%05d}.tar" % (n - 1)
        by_pattern = list(ShardReader(pattern, index=base + "/index.json", retry=FAST).iter_range(10, 20))
    assert [(s.fields, s.media) for s in remote] == [(s.fields, s.media) for s in local]
    assert [s.key for s in by_pattern] == [s.key for s in local[10:20]]


def test_through_an_fsspec_url_equals_local(synth):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for path in synth["shards"].iterdir():
        fs.pipe(f"/shards-test/{path.name}", path.read_bytes())
    try:
        remote = list(ShardReader("memory://shards-test", retry=FAST))
    finally:
        fs.rm("/shards-test", recursive=True)
    assert [(s.fields, s.media) for s in remote] == [(s.fields, s.media) for s in ShardReader(str(synth["shards"]))]


def test_a_url_without_its_filesystem_is_one_line():
    pytest.importorskip("fsspec")
    with pytest.raises(DataError, match=r"cannot fetch nosuchfs://bucket/set/index\.json: no filesystem for it"):
        ShardReader("nosuchfs://bucket/set/", retry=FAST)


def test_a_404_names_the_url_at_once(synth, tmp_path):
    copy = copy_shards(synth, tmp_path)
    (copy / "train-00001.tar").unlink()
    with serve(copy) as (_, base):
        reader = ShardReader(base, retry=RetryPolicy(attempts=3, backoff_s=5.0, timeout_s=2.0))
        started = time.monotonic()
        with pytest.raises(DataError, match=r"cannot fetch http://127\.0\.0\.1:\d+/train-00001\.tar: HTTP 404"):
            list(reader)
        assert time.monotonic() - started < 4.0  # final: no backoff of 5 s spent on it


def test_a_stopped_server_gives_up_after_the_retries(synth):
    with serve(synth["shards"]) as (server, base):
        reader = ShardReader(base, retry=FAST)
    started = time.monotonic()
    with pytest.raises(DataError, match=r"cannot fetch http://127\.0\.0\.1:\d+/train-00000\.tar: .*gave up after "
                                        r"3 attempts"):
        list(reader)
    assert time.monotonic() - started < 5.0
    with pytest.raises(DataError, match="index.json"):
        ShardReader(base, retry=FAST)


class _CutOnce(_Quiet):
    """Sends half of the first response for each shard, then closes the connection."""
    cut: set = set()

    def copyfile(self, source, outputfile):
        data = source.read()
        if self.path.endswith(".tar") and self.path not in self.cut:
            type(self).cut.add(self.path)
            outputfile.write(data[:len(data) // 2])
            outputfile.flush()
            self.close_connection = True
            return
        outputfile.write(data)


class _AlwaysCut(_CutOnce):
    def copyfile(self, source, outputfile):
        type(self).cut.clear()
        super().copyfile(source, outputfile)


class _Stall(_Quiet):
    def do_GET(self):
        if self.path.endswith(".tar"):
            time.sleep(1.5)
        return super().do_GET()


def test_a_connection_cut_mid_shard_resumes(synth):
    local = list(ShardReader(str(synth["shards"])))
    with serve(synth["shards"], _CutOnce) as (_, base):
        remote = list(ShardReader(base, retry=FAST))
    assert [(s.fields, s.media) for s in remote] == [(s.fields, s.media) for s in local]
    assert len(_CutOnce.cut) == len(synth["index"].shards)
    with serve(synth["shards"], _AlwaysCut) as (_, base):
        with pytest.raises(DataError, match=r"train-00000\.tar: .*gave up after 3 attempts"):
            list(ShardReader(base, retry=FAST))


def test_a_stalled_server_times_out(synth):
    with serve(synth["shards"], _Stall) as (_, base):
        reader = ShardReader(base, retry=RetryPolicy(attempts=2, backoff_s=0.01, timeout_s=0.3))
        started = time.monotonic()
        with pytest.raises(DataError, match=r"train-00000\.tar: .*timed out.*gave up after 2 attempts"):
            next(iter(reader))
        assert time.monotonic() - started < 1.5


# --------------------------------------------------------------------------- damaged shards

def _image_member(shard: Path) -> str:
    with tarfile.open(shard) as tar:
        return next(m.name for m in tar if m.name.endswith(".png") and m.name.startswith(tar.getnames()[2][:10]))


def test_a_corrupt_member_names_shard_and_key(synth, tmp_path):
    copy = copy_shards(synth, tmp_path)
    shard = copy / "train-00001.tar"
    name = _image_member(shard)
    key = split_member_name(name)[0]
    rewrite_tar(shard, lambda n, data: data[:-3] + b"xyz" if n == name else data)
    with pytest.raises(DataError, match=rf"shard train-00001\.tar \(.*\), sample {key}: .*{name}.* is corrupt") as err:
        list(ShardReader(str(copy)))
    assert err.value.reason == "unreadable_image"
    reader = ShardReader(str(copy), skip_bad_samples=True, max_skip_fraction=0.5)
    kept = list(reader)
    assert len(kept) == 47 and key not in {s.key for s in kept}
    assert reader.skip_counts == {"unreadable_image": 1}


def test_a_missing_image_member_names_shard_and_key(synth, tmp_path):
    copy = copy_shards(synth, tmp_path)
    shard = copy / "train-00002.tar"
    name = _image_member(shard)
    key = split_member_name(name)[0]
    rewrite_tar(shard, lambda n, data: None if n == name else data)
    with pytest.raises(DataError, match=rf"train-00002\.tar .*sample {key}: .*{name}.* is missing") as err:
        list(ShardReader(str(copy)))
    assert err.value.reason == "missing_image"
    bad_json = copy / "train-00003.tar"
    with tarfile.open(bad_json) as tar:
        first = tar.getnames()[0]
    rewrite_tar(bad_json, lambda n, data: b"{not json" if n == first else data)
    with pytest.raises(DataError, match=rf"train-00003\.tar .*sample {split_member_name(first)[0]}: {first} is not a "
                                        "sample document"):
        list(ShardReader(str(copy)).iter_shards([3]))
    reader = ShardReader(str(copy), skip_bad_samples=True, max_skip_fraction=0.5)
    assert len(list(reader)) == 46
    assert reader.skip_counts == {"missing_image": 1, BAD_SAMPLE: 1}


def test_a_broken_tar_names_the_shard_and_the_last_good_key(synth, tmp_path):
    copy = copy_shards(synth, tmp_path)
    shard = copy / "train-00001.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    victim = members[4]  # a header in the middle of the shard
    data[victim.offset:victim.offset + 100] = b"\xff" * 100
    shard.write_bytes(bytes(data))
    last_good = split_member_name(members[3].name)[0]
    # tarfile ends a stream quietly at a bad header after the first: the index's count tells.
    with pytest.raises(DataError, match=rf"shard train-00001\.tar \(.*\): it ends after sample {last_good}, at 2 of "):
        list(ShardReader(str(copy)))
    truncated = copy / "train-00002.tar"
    with tarfile.open(truncated) as tar:
        members = tar.getmembers()
    truncated.write_bytes(truncated.read_bytes()[:members[3].offset_data + 10])  # inside member 3's bytes
    last_good = split_member_name(members[1].name)[0]
    with pytest.raises(DataError, match=rf"shard train-00002\.tar .*corrupt or truncated after sample {last_good} "):
        list(ShardReader(str(copy)).iter_shards([2]))


def test_a_changed_shard_fails_its_checksum(synth, tmp_path):
    copy = copy_shards(synth, tmp_path)
    shard = copy / "train-00000.tar"
    data = bytearray(shard.read_bytes())
    data[-1] = 1  # the zero padding at the end: no sample notices, the checksum does
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00000\.tar .*the index says .*changed after the index"):
        list(ShardReader(str(copy)).iter_shards([0]))
    assert len(list(ShardReader(str(copy), verify_checksums=False).iter_shards([0]))) > 0


# --------------------------------------------------------------------------- the writer's rules

def _write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_a_path_leaving_the_image_root_is_refused(tmp_path):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(b"png-bytes")
    (tmp_path / "secret.png").write_bytes(b"secret")
    rows = [dict(qry="q", qry_image_path="img/a.png", pos_text=f"t{i}", pos_image_path="") for i in range(3)]
    rows.append(dict(qry="q", qry_image_path="../secret.png", pos_text="t", pos_image_path=""))
    _write_jsonl(tmp_path / "data" / "Sub.jsonl", rows)
    with pytest.raises(DataError, match=r"subset 'Sub' \(.*Sub\.jsonl\), row 3, field 'qry_image_path': .*outside "
                                        r"the image root") as err:
        write_shards(str(tmp_path / "data"), str(tmp_path / "out"), image_root=str(root))
    assert err.value.reason == "path_outside_root" and not (tmp_path / "out" / INDEX_NAME).exists()
    assert not list((tmp_path / "out").glob("*.tar")) and not list((tmp_path / "out").glob(".*"))
    index = write_shards(str(tmp_path / "data"), str(tmp_path / "out"), image_root=str(root), skip_bad_rows=True,
                         max_skip_fraction=0.5)
    assert index.num_samples == 3 and index.subsets["Sub"]["skipped"] == {"path_outside_root": 1}
    assert all(b"secret" not in p.read_bytes() for p in (tmp_path / "out").glob("*.tar"))


def test_videos_frame_folders_and_llave_json_arrays(tmp_path):
    root = tmp_path / "data"
    (root / "v").mkdir(parents=True)
    (root / "v" / "clip.mp4").write_bytes(b"not really a video, kept byte for byte")
    (root / "v" / "frames").mkdir()
    for name in ("10.png", "2.png"):
        (root / "v" / "frames" / name).write_bytes(f"frame {name}".encode())
    rows = [dict(qry="<|video_1|> what happens?", qry_image_path="", qry_video_path="v/clip.mp4",
                 pos_text="a clip", pos_image_path=""),
            dict(qry="find the clip", qry_image_path="", pos_text="", pos_image_path="",
                 pos_video_path="v/frames", neg_text=["x", "y"], neg_image_path=["", ""],
                 neg_video_path=["", "v/clip.mp4"])]
    (root / "Vid.json").write_text(json.dumps(rows), encoding="utf-8")  # LLaVE's JSON array layout
    index = write_shards(str(root), str(tmp_path / "out"))
    samples = list(ShardReader(str(tmp_path / "out")))
    assert [s.fields for s in samples] == rows and index.num_samples == 2
    assert samples[0].media == {"v/clip.mp4": (root / "v" / "clip.mp4").read_bytes()}
    assert samples[1].media["v/frames"] == [("2.png", b"frame 2.png"), ("10.png", b"frame 10.png")]
    assert samples[1].media["v/clip.mp4"] == (root / "v" / "clip.mp4").read_bytes()
    with tarfile.open(tmp_path / "out" / "train-00000.tar") as tar:
        assert "0000000001.neg1.mp4" in tar.getnames() and "0000000001.pos.f00001.png" in tar.getnames()


def test_the_shard_command(synth, tmp_path, capsys):
    out = tmp_path / "cmd"
    assert cli.main(["shard", "--data", synth["train"], "--image-root", str(synth["images"]), "--out", str(out),
                     "--shard-size", "20KB", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("wrote 48 samples of 48 rows (4 subset(s)) into ") and "index.json" in line
    first = sorted(p.name for p in out.glob("*.tar"))
    assert len(first) > 1
    # Rewriting the set with larger shards replaces it: no stale shard is left behind.
    assert cli.main(["shard", "--data", synth["train"], "--image-root", str(synth["images"]), "--out", str(out),
                     "--shard-size", "1GB", "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-00000.tar"]
    assert len(list(ShardReader(str(out)))) == 48
    assert cli.main(["shard", "--data", synth["train"], "--out", synth["train"], "--no-progress"]) == 2
    assert "is the source directory" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert cli.main(["shard", "--data", synth["train"], "--out", str(busy), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_names_and_sizes():
    assert expand_braces("s3://b/train-{00000..00002}.tar") == [f"s3://b/train-0000{i}.tar" for i in range(3)]
    assert expand_braces("a{1..3}{x,y}") == ["a1x", "a1y", "a2x", "a2y", "a3x", "a3y"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="neither a range"):
        expand_braces("a{b}")
    assert (parse_size("256MB"), parse_size("1GiB"), parse_size("500")) == (256_000_000, 1 << 30, 500)
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")
    policy = RetryPolicy(backoff_s=1, max_backoff_s=5)
    assert [policy.delay(k) for k in (1, 2, 3, 9)] == [1, 2, 4, 5]
