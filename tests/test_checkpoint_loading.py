"""What a checkpoint file may do when loaded (issue 29, part 3): our RNG files and DeepSpeed's
model-states file are read with ``weights_only=True``, so a stranger's file cannot run code
through them; RNG files written before that change still resume; naming a damaged file after a
failed load unpickles nothing."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from llave_ds.training import checkpoint as ckpt


class Payload:
    """Unpickling it runs code: it would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()
    ckpt.save_rng_state(tmp_path, 0)
    want = draws()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.load_rng_state(tmp_path, 0)
    assert draws() == want
    torch.load(tmp_path / "rng_rank0.pt", weights_only=True)       # plain types only: no allowlist needed


def test_an_rng_file_of_the_old_format_still_resumes(tmp_path):
    """Before 2026-12-07 numpy's state was pickled as an array: read through the numpy-only
    allowlist, never with weights_only=False."""
    np.random.seed(5)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch_cpu": torch.get_rng_state()}
    torch.save(old, tmp_path / "rng_rank1.pt")
    want = float(np.random.rand())
    np.random.seed(0)
    ckpt.load_rng_state(tmp_path, 1)
    assert float(np.random.rand()) == want


def test_a_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"python": Payload(marker)}, tmp_path / "rng_rank0.pt")
    with pytest.raises(ckpt.CheckpointError, match="cannot read RNG state"):
        ckpt.load_rng_state(tmp_path, 0)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_own_file(tmp_path / "rng_rank0.pt")
    assert not marker.exists()
    # naming a damaged file after a failed load reads the archive, not the pickle
    (tmp_path / "sub").mkdir()
    torch.save({"module": Payload(marker)}, tmp_path / "sub" / "mp_rank_00_model_states.pt")
    assert ckpt.find_unreadable_file(tmp_path) is None and not marker.exists()


def test_a_damaged_file_is_named_without_unpickling(tmp_path):
    torch.save({"w": torch.arange(1000.0)}, tmp_path / "a_model_states.pt")
    torch.save({"w": torch.arange(1000.0)}, tmp_path / "b_optim_states.pt")
    assert ckpt.find_unreadable_file(tmp_path) is None
    data = bytearray((tmp_path / "b_optim_states.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF                                     # a flipped byte inside the tensor data
    (tmp_path / "b_optim_states.pt").write_bytes(bytes(data))
    path, why = ckpt.find_unreadable_file(tmp_path)
    assert path.name == "b_optim_states.pt" and "corrupted" in why
    (tmp_path / "b_optim_states.pt").write_bytes(bytes(data[:100]))  # truncated
    path, why = ckpt.find_unreadable_file(tmp_path)
    assert path.name == "b_optim_states.pt" and "BadZipFile" in why
