"""Lightning's ``BameCallback`` (issue 16, section 1): the doc example as printed, equality with the plain
loop, exact resume, DDP on two CPU processes, and its refusals."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, free_port, subprocess_env

import bame
from bame.cli import main
from bame.errors import CheckpointError, ConfigError
from bame.export import load_compressed
from bame.nm import is_nm

pl = pytest.importorskip("lightning.pytorch", reason="Lightning comes with bame[lightning]")
from bame.integrations.lightning import BameCallback  # noqa: E402  (needs lightning)

DOC = ROOT / "docs" / "lightning.md"
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
         "accelerator": "cpu"}


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                       torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def batches():
    """Four batches of 16, always the same."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=16)


def test_doc_example_runs_as_printed(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "doc"}
    exec(compile(code, str(DOC), "exec"), scope)
    assert "resumed run identical: True" in capsys.readouterr().out
    model = scope["model"]
    assert type(model.net[2]) is torch.nn.Linear and is_nm(model.net[2].weight != 0, 2, 4, exact=False)
    # The shell line of the page: the last checkpoint exported, loaded into a fresh model, same outputs.
    assert main(["export", "checkpoints/epoch=3-step=32.ckpt", "--format", "compressed"]) == 0
    rebuilt = load_compressed("checkpoints/epoch=3-step=32.compressed.safetensors", model=scope["Classifier"]())
    x = torch.randn(5, 32)
    assert torch.equal(rebuilt.net(x), model.eval().net(x))
    assert torch.equal(load_compressed("classifier.safetensors", model=scope["Classifier"]()).net(x), model.net(x))


def test_lightning_run_equals_the_plain_loop():
    """Same init, data and optimizer: Lightning with the callback and a plain loop with ``bame.sparsify``
    give identical weights and masks (Lightning's closure would otherwise hide the gradient from the
    sparsifier's pre-hook)."""
    options = {"method": "bame", "nm": "2:4", "delta_t": 2}
    torch.manual_seed(0)
    module = Net()
    callback = BameCallback(**options)
    pl.Trainer(max_epochs=3, callbacks=[callback], **QUIET).fit(module, batches())

    torch.manual_seed(0)
    plain = Net()
    optimizer = plain.configure_optimizers()
    sparsifier = bame.sparsify(plain, optimizer, total_steps=12, **options)
    for _ in range(3):
        for batch in batches():
            loss = plain.training_step(batch, 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert callback.sparsifier.state_dict()["step"] == sparsifier.state_dict()["step"] == 12
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), plain.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(callback.sparsifier.masks().values(), sparsifier.masks().values()))


def test_resume_refuses_another_total_steps(tmp_path):
    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=1, callbacks=[BameCallback(nm="2:4")], **QUIET)
    trainer.fit(Net(), batches())
    trainer.save_checkpoint(tmp_path / "t4.ckpt")
    longer = pl.Trainer(max_epochs=2, callbacks=[BameCallback(nm="2:4")], **QUIET)
    with pytest.raises(CheckpointError, match="T=4 optimizer steps, this one 8"):
        longer.fit(Net(), batches(), ckpt_path=tmp_path / "t4.ckpt", weights_only=True)


def test_refuses_asp_and_an_endless_run_leaving_the_model_plain():
    module = Net()
    with pytest.raises(ConfigError, match="restarts the optimizer at step 2"):
        pl.Trainer(max_epochs=1, callbacks=[BameCallback(method="asp", nm="2:4")], **QUIET).fit(module, batches())
    assert type(module.net[0]) is torch.nn.Linear and "parametrizations" not in dict(module.net[0].named_children())
    with pytest.raises(ConfigError, match="needs a finite run"):
        pl.Trainer(max_epochs=-1, callbacks=[BameCallback(nm="2:4")], **QUIET).fit(Net(), batches())


DDP_SCRIPT = textwrap.dedent('''
    import os, sys
    import torch
    import lightning.pytorch as pl
    from bame.integrations.lightning import BameCallback
    sys.path.insert(0, sys.argv[2])
    from test_integrations_lightning import Net, batches, QUIET

    class AtSetup(pl.Callback):
        """Records the weights right after BameCallback attached the masks (before DDP wraps the module)."""
        def setup(self, trainer, pl_module, stage):
            self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}

    torch.manual_seed(int(os.environ.get("LOCAL_RANK", "0")))  # each rank its own init: ranks must agree anyway
    callback, at_setup = BameCallback(method="bame", nm="2:4", delta_t=2), AtSetup()
    trainer = pl.Trainer(max_epochs=2, devices=2, strategy="ddp", callbacks=[callback, at_setup],
                         **{**QUIET, "enable_checkpointing": False})
    module = Net()
    trainer.fit(module, batches())
    state = {"setup": at_setup.weights, "model": module.state_dict(), "sparsifier": callback.sparsifier.state_dict()}
    torch.save(state, os.path.join(sys.argv[1], f"rank{trainer.global_rank}.pt"))
''')


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("setup", "model"):
        assert all(torch.equal(rank0[key][k], rank1[key][k]) for k in rank0[key]), key
    # 64 samples over 2 ranks in batches of 16: 2 steps per epoch, 2 epochs.
    assert rank0["sparsifier"]["step"] == 4
    for name, entry in rank0["sparsifier"]["layers"].items():
        assert torch.equal(entry["mask"], rank1["sparsifier"]["layers"][name]["mask"])
        assert is_nm(entry["mask"], 2, 4)
