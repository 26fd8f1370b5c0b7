"""--stream cleans up on SIGINT/SIGTERM like every other output: the compressed layers' files
(`.stream-*/layer-*.safetensors`, beside the --save target or in $TMPDIR) go with the run.

The CLI ends its process with os._exit, so nothing it still references is collected on the way out; here the
streamed model is kept alive the same way (a list holds it), and the signal arrives, for real, while the compressed
model is being evaluated: every layer has been written by then.
"""
from __future__ import annotations

import os
import signal
import tempfile
import time

import pytest

import opt_enhanced as oe
import pipeline.run
from systems import streaming

QUICK = ["--nsamples", "2", "--seqlen", "32", "--quiet", "--device", "cpu", "--eval", "ptb"]


@pytest.mark.parametrize("signum,code,save", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)],
                         ids=["SIGINT-beside-save", "SIGTERM-in-tmpdir"])
def test_a_signal_during_a_streamed_run_leaves_no_layer_files(tiny_dir, tmp_path, monkeypatch, capsys, signum, code,
                                                              save):
    scratch_tmp = tmp_path / "tmp"
    scratch_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_tmp))
    out = tmp_path / "out"
    out.mkdir()
    held, seen = [], []
    real_load = streaming.load_streamed

    def load_and_hold(*args, **kwargs):
        held.append(real_load(*args, **kwargs))  # alive after main() returns, as under os._exit
        return held[-1]

    def signalled(*args, **kwargs):
        store = held[0].layer_store
        seen.extend(os.listdir(store.scratch))
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises in the main thread before this ends
    monkeypatch.setattr(streaming, "load_streamed", load_and_hold)
    monkeypatch.setattr(pipeline.run, "perplexity", signalled)
    model, data = tiny_dir
    flags = ["--save", str(out / "s")] if save else []
    assert oe.main([str(model), "c4", "--data_dir", str(data), *QUICK, "--sparsity", "0.5", "--stream", *flags]) == code
    assert "temporary outputs removed" in capsys.readouterr().err
    assert sorted(seen) == ["layer-00000.safetensors", "layer-00001.safetensors"]  # the layers had been written
    assert os.listdir(out) == [] and os.listdir(scratch_tmp) == []
    assert held and not os.path.exists(held[0].layer_store.scratch)
