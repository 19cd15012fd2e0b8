"""Mined vs random hard negatives on the offline synthetic task, from the ablation's warm start
(issue 28): does ``llave-ds mine`` pick negatives that train better than random ones?

    python benchmarks/mining.py [--seeds 0 1 2 3 4] [--work DIR] [--figure PNG]

Per seed, four runs from that seed's warm start (``llave_ds.toy.warm_start``), all the
ablation's arm (c) (alpha 9, exact gather over 2 ranks, global batch 64, 150 steps, lr 1e-3,
ZeRO-2, ``configs/demo_cpu.yaml``) with one hard negative per row
(``data.use_hard_negatives=true data.num_hard_negatives=1``), differing only in where that
negative comes from:

  random      the positive of another row of the same subset, drawn uniformly (seeded by
              the seed) among the rows whose positive is not a copy of this row's (the
              copy rule of ``llave_ds.mine.select.side_keys``: the same image file, or the
              same text for text-only sides), written into a copy of the train data
              (``llave_ds.data.row_files``);
  mined-warm  ``llave-ds mine --num-negatives 1`` (depth 100, relative margin 0.95, top: the
              defaults) with the seed's warm-start model, formatting as training does
              (``processing`` of the config: max_length 128, system prompt "Embed.");
  mined-r2    the same mining with the model trained in the seed's random arm (its export):
              a second round of mining; then trained from the warm start like the others;
  oracle      the data's own one-attribute negatives (the synthetic train split unchanged:
              this is the ablation's arm (c), run name and all).

A mined row left with no negative (the summary's ``short``: every candidate scored above the
margin or was a copy) would be refused by training (``num_hard_negatives=1``; with
``data.skip_bad_rows`` it would be dropped, and the arms would train on different rows): it
gets that row's random-arm negative instead, counted per subset and printed (``filled``).

Each export is scored by the ablation's ``evaluate_model``: hard P@1 (Synth_I2T_Hard and
Synth_T2I_Hard, chance 1/11), hard gap, P@1 over the six subsets. For the random and mined
data also the **neighbour rate**: the share of the rows' negatives that are one-attribute
neighbours of the positive (Synth_I2T, Synth_T2I; from ``attributes/train``), the share of
another image of the positive's own scene (Synth_T2I: a false negative), and the share of
neighbours in the pool (what a uniform draw gets). Printed: tables (mean ± std over seeds),
paired tests across seeds (t-test and exact sign-flip), a PNG of the per-seed hard P@1, and
one JSON line last. Runs, minings and data copies are kept under ``--work`` and reused.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation  # noqa: E402  (benchmarks/ablation.py: runs, evaluation, paired tests)

ARMS = {
    "random": "random in-data negative",
    "mined-warm": "mined with the warm start",
    "mined-r2": "mined with the random arm's model (round 2)",
    "oracle": "the data's own one-attribute negative",
}
PAIRS = [("mined-warm", "random"), ("mined-r2", "random"), ("oracle", "random"), ("mined-r2", "mined-warm"),
         ("oracle", "mined-r2")]
NEIGHBOUR_SUBSETS = {"Synth_I2T": ("pos_text", "neg_text"), "Synth_T2I": ("pos_image_path", "neg_image_path")}
NEGATIVE_FIELDS = ("neg_text", "neg_image_path")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--zero", choices=("zero2", "zero3"), default="zero2")
    p.add_argument("--train-per-subset", type=int, default=256)
    p.add_argument("--eval-per-subset", type=int, default=96)
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument("--warm-steps", type=int, default=300)
    p.add_argument("--mine-workers", type=int, default=2, help="DataLoader workers of each mining")
    p.add_argument("--work", default="mining_out")
    p.add_argument("--cache-dir", default=None, help="warm-start cache (default: llave_ds.toy.warm_start's)")
    p.add_argument("--figure", default=None, help="PNG of the per-seed hard P@1 (default: --work)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------- the data

def _files(source: Path):
    from llave_ds.data.row_files import row_files
    return row_files(str(source))


def digest(source: Path) -> str:
    """sha256 over the data files of a training copy (what the run's key records)."""
    h = hashlib.sha256()
    for f in _files(source):
        h.update(str(f.relative).encode() + b"\0" + f.path.read_bytes())
    return h.hexdigest()[:16]


def random_negatives(train_dir: Path, seed: int) -> dict:
    """subset -> per row, the (text, image path) of another row's positive, drawn uniformly
    among the rows whose positive is not a copy of this row's; seeded by (seed, subset)."""
    import numpy as np

    from llave_ds.data.row_files import read_rows
    from llave_ds.data.train_rows import train_row_sides
    from llave_ds.mine.select import side_keys

    out = {}
    for f in _files(train_dir):
        positives = [train_row_sides(row)[1] for row in read_rows(f)]
        keys = [side_keys(*p) for p in positives]
        rng = np.random.default_rng([seed, zlib.crc32(f.subset.encode())])
        drawn = []
        for i, own in enumerate(keys):
            others = [j for j, k in enumerate(keys) if j != i and not (k & own)]
            if not others:
                raise SystemExit(f"{f.path}, row {i}: every other row's positive is a copy of this one's; "
                                 "no random negative can be drawn")
            j = others[int(rng.integers(len(others)))]
            drawn.append((positives[j][0], positives[j][1]))
        out[f.subset] = drawn
    return out


def write_training_copy(train_dir: Path, out: Path, negatives: dict) -> None:
    """The train data with each row's negative fields set to ``negatives[subset][row]``."""
    from llave_ds.data.row_files import read_rows, write_rows

    for f in _files(train_dir):
        rows = read_rows(f)
        chosen = negatives[f.subset]
        assert len(chosen) == len(rows), (f.path, len(chosen), len(rows))
        new = [{**row, "neg_text": [t for t, _ in neg], "neg_image_path": [p for _, p in neg]}
               for row, neg in zip(rows, chosen)]
        write_rows(f, new, out, NEGATIVE_FIELDS)


def mined_negatives(mined_dir: Path, random: dict) -> tuple:
    """subset -> per row, the mined negatives ([(text, image)]), a row the mining left empty
    filled with its random-arm negative; and subset -> the rows filled."""
    from llave_ds.data.row_files import read_rows

    out, filled = {}, {}
    for f in _files(mined_dir):
        rows = read_rows(f)
        per_row, empty = [], []
        for i, row in enumerate(rows):
            texts, images = list(row.get("neg_text") or []), list(row.get("neg_image_path") or [])
            if not texts and not images:
                per_row.append([random[f.subset][i]])
                empty.append(i)
            else:
                images = images or [""] * len(texts)
                texts = texts or [""] * len(images)
                per_row.append(list(zip(texts, images)))
        out[f.subset], filled[f.subset] = per_row, empty
    return out, filled


def neighbour_rates(data_root: Path, train_dir: Path, negatives: dict, skip=None) -> dict:
    """Synth_I2T / Synth_T2I: the share of the rows' negatives that are one-attribute
    neighbours of the positive's scene, the share showing the positive's own scene, and the
    share of neighbours among the pool (every distinct positive but the row's own).
    ``skip``: subset -> rows left out of the negatives' shares (e.g. the filled ones)."""
    from llave_ds.data.row_files import read_rows

    out = {}
    files = {f.subset: f for f in _files(train_dir)}
    for subset, (field, neg_field) in NEIGHBOUR_SUBSETS.items():
        if subset not in files or subset not in negatives:
            continue
        rows = read_rows(files[subset])
        lines = (data_root / "attributes" / "train" / f"{subset}.jsonl").read_text().splitlines()
        scenes = [json.loads(line)["positive"] for line in lines]
        scene = {}
        for row, s in zip(rows, scenes):
            scene.setdefault(row[field], s)
        column = 0 if neg_field == "neg_text" else 1

        def diff(a, b):
            return sum(a[k] != b[k] for k in a)
        hits = same = total = pool_hits = pool_total = 0
        left_out = set((skip or {}).get(subset, ()))
        for i, (row, s, negs) in enumerate(zip(rows, scenes, negatives[subset])):
            for neg in [] if i in left_out else negs:
                d = diff(scene[neg[column]], s)
                hits, same, total = hits + (d == 1), same + (d == 0), total + 1
            others = [diff(t, s) for key, t in scene.items() if key != row[field]]
            pool_hits, pool_total = pool_hits + sum(d == 1 for d in others), pool_total + len(others)
        out[subset] = {"neighbour": hits / total if total else float("nan"),
                       "same_scene": same / total if total else float("nan"),
                       "pool_neighbour": pool_hits / pool_total, "negatives": total}
    return out


# ------------------------------------------------------------------------------- mining

def warm_model_for_mining(warm_dir: str, dest: Path) -> Path:
    """The warm start as training formats it: a copy (mtimes kept, so the mining's model
    fingerprint stays put) with an ``llave_embedding.json`` holding the config's
    ``processing`` (max_length, system prompt), as an export of the run would."""
    import yaml

    from llave_ds.formats import EMBEDDING_METADATA

    shipped = yaml.safe_load(ablation.CONFIG.read_text())["processing"]
    metadata = {"input_format": {k: shipped[k] for k in ("max_length", "system_prompt") if k in shipped},
                "note": "the warm start's weights, formatted as configs/demo_cpu.yaml trains (benchmarks/mining.py)"}
    text = json.dumps(metadata, indent=2) + "\n"
    if not (dest / "config.json").is_file() or not (dest / EMBEDDING_METADATA).is_file() \
            or (dest / EMBEDDING_METADATA).read_text() != text:
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(warm_dir, dest)           # copy2: mtimes preserved
        (dest / EMBEDDING_METADATA).write_text(text)
    return dest


def mine(args, model_dir: Path, train_dir: Path, image_root: Path, out: Path) -> dict:
    """``python -m llave_ds.mine.run`` (one process) with ``--num-negatives 1`` and the
    defaults otherwise; a finished mining of the same model and data is reused. Returns its
    ``mining.json`` record."""
    from llave_ds.eval.score_files import model_fingerprint
    from llave_ds.formats import MINING_RECORD

    record_file = out / MINING_RECORD
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("model_fingerprint") == model_fingerprint(str(model_dir)) \
                and record.get("data") == str(train_dir) and record["parameters"]["num_negatives"] == 1:
            return record
        record_file.unlink()
    cmd = [sys.executable, "-m", "llave_ds.mine.run", "--model", str(model_dir), "--data", str(train_dir),
           "--image-root", str(image_root), "--out", str(out), "--num-negatives", "1", "--no-progress",
           "--num-workers", str(args.mine_workers)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (out / "mining_log.txt").write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"mining with {model_dir} failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}")
    record = json.loads(record_file.read_text())
    record["seconds"] = round(time.time() - t0, 1)
    record_file.write_text(json.dumps(record, indent=1) + "\n")
    return record


def mined_arm(args, name: str, seed: int, model_dir: Path, data, work: Path, random: dict) -> dict:
    """Mine with ``model_dir``, fill short rows, write the training copy; its summary."""
    train_dir, image_root = Path(data[0]), Path(data[1])
    record = mine(args, model_dir, train_dir, image_root, work / "mined" / f"{name}_s{seed}")
    negatives, filled = mined_negatives(work / "mined" / f"{name}_s{seed}", random)
    source = work / "train" / f"{name}_s{seed}"
    write_training_copy(train_dir, source, negatives)
    total = record["total"]
    n_filled = {subset: len(rows) for subset, rows in filled.items()}
    if sum(n_filled.values()) != total.get("short", 0):
        raise RuntimeError(f"{name}, seed {seed}: {sum(n_filled.values())} empty rows, but the mining counts "
                           f"{total.get('short', 0)} short")
    print(f"[mining] {name} seed {seed}: kept {total.get('kept', 0)}, above margin {total.get('above_margin', 0)}, "
          f"short {total.get('short', 0)} (filled from the random draw: {n_filled}) [{record.get('seconds', 0)} s]",
          flush=True)
    return {"source": source, "negatives": negatives, "filled": filled, "record": record}


def counts_of(record: dict) -> dict:
    t = record["total"]
    return {k: int(t.get(k, 0)) for k in ("queries", "kept", "above_margin", "copy", "short")}


# ------------------------------------------------------------------------------- the figure

def plot(values: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(values)
    seeds = len(next(iter(values.values())))
    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=120)
    for s in range(seeds):
        ax.plot(range(len(arms)), [values[a][s] for a in arms], color="grey", alpha=0.5, marker=".", linewidth=1)
    means = [statistics.mean(values[a]) for a in arms]
    ax.plot(range(len(arms)), means, color="black", marker="o", linewidth=2, label=f"mean of {seeds} seeds")
    ax.axhline(1 / 11, color="grey", linestyle=":", linewidth=1, label="chance (1/11)")
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("hard P@1")
    ax.set_title("one hard negative per row: where it comes from (grey: one seed)", fontsize=10)
    ax.legend(fontsize=8)
    return ablation.save_figure(fig, path)


# ------------------------------------------------------------------------------- the driver

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ranks < 2:
        raise SystemExit("arm (c) gathers across ranks: --ranks must be >= 2")
    t_start = time.time()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, models = ablation.synthetic_data_and_warm_starts(args, work)
    train_dir, data_root = Path(data[0]), Path(data[1])

    def key(seed, arm=None, source=None):
        negatives = {"arm": arm, "source": str(source), "num": 1, "digest": digest(source)} if arm else None
        return ablation.run_key(args, seed, 9.0, "exact", 1, 1, models[seed], negatives=negatives)

    # -- phase 1: random, mined with the warm start, oracle ----------------------------------
    random, mined, keys = {}, {"mined-warm": {}, "mined-r2": {}}, {arm: {} for arm in ARMS}
    for seed in args.seeds:
        random[seed] = {subset: [[neg] for neg in negs]
                        for subset, negs in random_negatives(train_dir, seed).items()}
        source = work / "train" / f"random_s{seed}"
        write_training_copy(train_dir, source, random[seed])
        keys["random"][seed] = key(seed, "random", source)
        model = warm_model_for_mining(models[seed], work / "models" / f"warm_s{seed}")
        mined["mined-warm"][seed] = mined_arm(args, "mined-warm", seed, model, data, work,
                                              {s: [n[0] for n in negs] for s, negs in random[seed].items()})
        keys["mined-warm"][seed] = key(seed, "mined-warm", mined["mined-warm"][seed]["source"])
        keys["oracle"][seed] = key(seed)           # the ablation's arm (c), unchanged
    results = ablation.run_phase(args, work, data, [keys[a][s] for a in ("random", "mined-warm", "oracle")
                                                    for s in args.seeds])

    # -- phase 2: mined with the random arm's model (round 2) --------------------------------
    for seed in args.seeds:
        export = work / "runs" / ablation.run_name(keys["random"][seed]) / "export"
        mined["mined-r2"][seed] = mined_arm(args, "mined-r2", seed, export, data, work,
                                            {s: [n[0] for n in negs] for s, negs in random[seed].items()})
        keys["mined-r2"][seed] = key(seed, "mined-r2", mined["mined-r2"][seed]["source"])
    results.update(ablation.run_phase(args, work, data, [keys["mined-r2"][s] for s in args.seeds]))

    # -- tables ------------------------------------------------------------------------------
    rows = {arm: [results[ablation.run_name(keys[arm][s])] for s in args.seeds] for arm in ARMS}
    table = {arm: {"label": ARMS[arm], "train_s": statistics.mean(r["train_s"] for r in rs),
                   **{m: ablation.mean_std([r[m] for r in rs]) for m in ablation.METRICS}} for arm, rs in rows.items()}
    paired = [{"x": x, "y": y, "metric": m, **ablation.paired_test(table[x][m]["values"], table[y][m]["values"])}
              for x, y in PAIRS for m in ablation.METRICS[:2]]
    negs = {"random": {s: random[s] for s in args.seeds},
            **{arm: {s: mined[arm][s]["negatives"] for s in args.seeds} for arm in mined}}
    rates = {arm: {s: neighbour_rates(data_root, train_dir, negs[arm][s]) for s in args.seeds} for arm in negs}
    mined_only = {arm: {s: neighbour_rates(data_root, train_dir, negs[arm][s], skip=mined[arm][s]["filled"])
                        for s in args.seeds} for arm in mined}
    counts = {arm: {s: {**counts_of(mined[arm][s]["record"]),
                        "filled": sum(len(r) for r in mined[arm][s]["filled"].values()),
                        "filled_per_subset": {k: len(r) for k, r in mined[arm][s]["filled"].items()}}
                    for s in args.seeds} for arm in mined}
    mining_s = {arm: {s: mined[arm][s]["record"].get("seconds") for s in args.seeds} for arm in mined}

    print(f"\nwarm start ({args.warm_steps} caption steps); seeds {args.seeds}; {args.steps} steps at batch "
          f"{args.batch}, alpha 9, gather over {args.ranks} ranks, lr {args.lr}, {args.zero}; one hard negative "
          f"per row")
    print("\n| negatives | hard P@1 (mean ± std) | hard gap (mean ± std) | P@1, 6 subsets | train s/run |")
    print("|---|---|---|---|---|")
    for arm, r in table.items():
        print(f"| {arm}: {r['label']} | {ablation.fmt(r['hard_p_at_1'])} | {ablation.fmt(r['hard_gap'], 4, True)} "
              f"| {ablation.fmt(r['p_at_1'])} | {r['train_s']:.0f} |")
    print("\nper seed, hard P@1:")
    print("| seed | " + " | ".join(ARMS) + " |")
    print("|---" * (len(ARMS) + 1) + "|")
    for i, s in enumerate(args.seeds):
        print(f"| {s} | " + " | ".join(f"{table[a]['hard_p_at_1']['values'][i]:.3f}" for a in ARMS) + " |")

    def ms(values, digits=3):
        return ablation.fmt(ablation.mean_std(values), digits)
    print("\nthe negatives (mean ± std over seeds; neighbour = one attribute from the positive's scene; "
          "own scene = another image of the positive's scene):")
    print("| negatives | kept | above margin | short (filled) | I2T neighbour | T2I neighbour | T2I own scene |")
    print("|---|---|---|---|---|---|---|")
    for arm in negs:
        c = counts.get(arm)
        cells = [ms([c[s][k] for s in args.seeds], 1) if c else "–" for k in ("kept", "above_margin", "short")]
        r = [rates[arm][s] for s in args.seeds]
        cells += [ms([x["Synth_I2T"]["neighbour"] for x in r]), ms([x["Synth_T2I"]["neighbour"] for x in r]),
                  ms([x["Synth_T2I"]["same_scene"] for x in r])]
        print(f"| {arm} | " + " | ".join(cells) + " |")
    chance = rates["random"][args.seeds[0]]
    print(f"| pool (chance) | | | | {chance['Synth_I2T']['pool_neighbour']:.3f} | "
          f"{chance['Synth_T2I']['pool_neighbour']:.3f} | |")
    print("| oracle | | | | 1 (by construction) | 1 (by construction) | 0 |")
    for arm in mined_only:
        r = [mined_only[arm][s] for s in args.seeds]
        print(f"{arm}, the mined rows only (filled rows left out): I2T neighbour "
              f"{ms([x['Synth_I2T']['neighbour'] for x in r])}, T2I neighbour "
              f"{ms([x['Synth_T2I']['neighbour'] for x in r])}, T2I own scene "
              f"{ms([x['Synth_T2I']['same_scene'] for x in r])}")
    ablation.print_paired(paired)
    png = plot({arm: table[arm]["hard_p_at_1"]["values"] for arm in ARMS},
               Path(args.figure) if args.figure else work / "mining_hard_p_at_1.png")
    wall = time.time() - t_start
    print(f"\nfigure: {png}\nwall time {wall:.0f} s")
    machine = f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores ({platform.machine()})"
    print(json.dumps(ablation.json_safe({
        "benchmark": "mining", "date": datetime.date.today().isoformat(), "machine": machine, "seeds": args.seeds,
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "zero": args.zero, "warm_steps": args.warm_steps,
        "arms": table, "paired": paired, "neighbour_rates": rates,
        "neighbour_rates_mined_rows": mined_only, "mining_counts": counts, "mining_s": mining_s,
        "runs": {arm: [ablation.run_name(keys[arm][s]) for s in args.seeds] for arm in ARMS},
        "wall_s": round(wall, 1)}), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
