"""PUMIT's optional adversarial term in the tokenizer stage (``shared/methods/pumit.md`` §2.3, switches ``gan`` and
``perceptual`` of §2.6, invariant 10): the hinge loss, the gate as checkpointed state, the discriminator trained
beside the generator with each network getting exactly its own loss's gradient, exact resume, two processes, and
the refusal of LPIPS."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from medmodal.cli import app
from medmodal.losses.pumit_tokenizer import GANGate, discriminator_hinge_loss, generator_gan_loss
from medmodal.methods.pumit.system import GATE_KEY, PUMITTokenizerSystem
from medmodal.networks.pumit_discriminator import PUMITDiscriminator
from medmodal.networks.registry import create_network

runner = CliRunner()
TINY = {"widths": [8, 16], "stem_stride": 4, "num_codes": 16, "code_dim": 8}
GAN = {"gan": True, "gan_channels": [8, 16]}


def invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


# -- losses and the gate ----------------------------------------------------------------------------------------

def test_hinge_and_generator_terms_on_known_patch_logits() -> None:
    real = torch.tensor([3.0, 1.0, 0.0, -1.0]).view(1, 1, 2, 2, 1)  # relu(1 - D): 0, 0, 1, 2 -> mean 0.75
    fake = torch.tensor([-3.0, -1.0, 0.0, 2.0]).view(1, 1, 2, 2, 1)  # relu(1 + D): 0, 0, 1, 3 -> mean 1.0
    assert discriminator_hinge_loss(real, fake).item() == pytest.approx(0.5 * (0.75 + 1.0))
    assert generator_gan_loss(fake).item() == pytest.approx(0.5)  # -mean D(x_hat)
    # a perfect discriminator (margins reached) has zero loss; an undecided one (D = 0) has loss 1
    assert discriminator_hinge_loss(real.abs() + 1, -fake.abs() - 1).item() == 0.0
    assert discriminator_hinge_loss(torch.zeros(2, 1, 3), torch.zeros(4, 1, 1)).item() == 1.0


def test_gate_invariant_10() -> None:
    gate = GANGate(threshold=0.3, weight=3e-3)
    assert not gate.is_open and gate.weight == 0.0  # closed before the discriminator has a loss
    emas, weights = [], []
    for loss in [1.0, 0.5] + [0.1] * 16:
        gate.update(loss)
        emas.append(gate.ema)
        weights.append(gate.weight)
    # EMA_0.9, the first loss starts it: 1, 0.9 + 0.05, 0.855 + 0.01, ..., then 0.1 + 0.765 * 0.9^k
    assert emas[:4] == pytest.approx([1.0, 0.95, 0.865, 0.7885], rel=1e-12)
    assert emas[-1] == pytest.approx(0.1 + 0.765 * 0.9**15, rel=1e-12)
    # the current loss (0.1) is below from the third step on, but the gate opens only once the EMA is too:
    # 0.765 * 0.9^k <= 0.2 first at k = 13 (the 16th update, index 15)
    first = weights.index(3e-3)
    assert first == 15 and emas[first] <= 0.3 < emas[first - 1]
    assert weights == [0.0] * first + [3e-3] * (len(weights) - first)
    ema_before = gate.ema
    gate.update(0.31)  # the current loss alone closes it, though the EMA stays below
    assert gate.ema == pytest.approx(0.9 * ema_before + 0.031) and gate.ema < 0.3
    assert not gate.is_open and gate.weight == 0.0
    gate.update(0.1)
    assert gate.is_open
    at = GANGate(threshold=0.25, weight=1.0, decay=0.0)
    at.update(0.25)
    assert at.is_open  # max(EMA, current) == threshold: on (<=)
    at.update(0.2500001)
    assert not at.is_open
    with pytest.raises(ValueError, match="decay"):
        GANGate(threshold=0.1, weight=1.0, decay=1.0)
    with pytest.raises(ValueError, match="threshold"):
        GANGate(threshold=0.0, weight=1.0)
    with pytest.raises(ValueError, match="finite"):
        gate.update(float("nan"))


def test_gate_state_round_trips_through_a_checkpoint() -> None:
    a = GANGate(threshold=0.2, weight=1e-3)
    for loss in (0.9, 0.3, 0.15):
        a.update(loss)
    buffer = io.BytesIO()
    torch.save({GATE_KEY: a.state_dict()}, buffer)
    buffer.seek(0)
    b = GANGate(threshold=0.2, weight=1e-3)
    b.load_state_dict(torch.load(buffer, weights_only=True)[GATE_KEY])
    assert (b.ema, b.current) == (a.ema, a.current)
    for loss in (0.1, 0.05, 0.05, 0.3, 0.01):
        a.update(loss)
        b.update(loss)
        assert (a.ema, a.current, a.weight) == (b.ema, b.current, b.weight)
    fresh = GANGate(threshold=0.2, weight=1e-3)
    fresh.load_state_dict(GANGate(threshold=0.2, weight=1e-3).state_dict())
    assert not fresh.is_open


# -- the system ---------------------------------------------------------------------------------------------------

def _system(*, gan: bool = True, gate: float = 0.025) -> PUMITTokenizerSystem:
    torch.manual_seed(0)
    net = create_network("pumit_tokenizer", in_channels=1, **TINY)
    disc = PUMITDiscriminator(in_channels=1, widths=(8, 16)) if gan else None
    return PUMITTokenizerSystem(network=net, weight_quant=0.03, weight_ent=1.0, optimizer="adamw", lr=1e-3,
                                weight_decay=0.05, momentum=0.9, schedule="constant", max_steps=10, warmup_steps=0,
                                discriminator=disc, gan_weight=0.5, gan_gate=gate, gan_lr=1e-2)


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 1, 16, 16, 8, generator=g)
    valid = torch.ones_like(image, dtype=torch.bool)
    valid[1, ..., 6:] = False  # padding slices in the second crop
    return {"image": image, "valid": valid, "da": 1}


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_each_network_gets_its_own_loss_and_the_generator_the_adversarial_term_only_when_open() -> None:
    batch = _batch()
    plain = _system(gan=False)
    plain.training_step(batch, 0).backward()
    closed, opened = _system(gate=1e-6), _system(gate=100.0)
    for s in (closed, opened):
        s.gate.update(0.5)  # closed: 0.5 > 1e-6; open: 0.5 <= 100
    assert not closed.gate.is_open and opened.gate.is_open
    for s in (closed, opened):
        s.training_step(batch, 0).backward()
    g_plain, g_closed, g_open = _grads(plain.network), _grads(closed.network), _grads(opened.network)
    # gate closed: the generator's gradient is the GAN-free one, bit for bit (the D loss never reaches it)
    assert g_plain.keys() == g_closed.keys() and all(torch.equal(g_plain[k], g_closed[k]) for k in g_plain)
    # the discriminator's gradient is that of its own hinge loss alone, whether the gate is open or not
    d_closed, d_open = _grads(closed.discriminator), _grads(opened.discriminator)
    assert d_closed.keys() == {n for n, _ in closed.discriminator.named_parameters()}
    assert all(torch.equal(d_closed[k], d_open[k]) and d_closed[k].any() for k in d_closed)
    # gate open: the generator gets exactly w_g * grad(-mean D(x_hat)) on top, D's parameters held fixed
    ref = _system(gan=True)
    x = batch["image"] * 2 - 1
    x_hat, _ = ref.network(x, 1)
    g_adv = generator_gan_loss(ref.discriminator(torch.where(batch["valid"], x_hat, x), 1))
    extra = dict(zip([n for n, _ in ref.network.named_parameters()],
                     torch.autograd.grad(g_adv, list(ref.network.parameters()), allow_unused=True), strict=True))
    changed = [k for k in g_open if not torch.equal(g_open[k], g_closed[k])]
    assert changed
    for k in g_open:
        add = torch.zeros_like(g_open[k]) if extra[k] is None else 0.5 * extra[k]
        assert torch.allclose(g_open[k], g_closed[k] + add, atol=1e-6, rtol=1e-5), k


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_two_steps_train_both_networks_and_feed_the_gate() -> None:
    system = _system(gate=100.0)
    opt = system.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]  # the generator's lr, the discriminator's gan_lr
    d0 = {k: v.clone() for k, v in system.discriminator.state_dict().items()}
    g0 = {k: v.clone() for k, v in system.network.state_dict().items()}
    opened = []
    for step in range(2):
        opened.append(system.gate.is_open)
        with torch.no_grad():
            terms = system.losses(_batch(step))
        opt.zero_grad()
        system.training_step(_batch(step), step).backward()
        opt.step()
        assert system.gate.current == pytest.approx(terms["d_loss"].item())  # this step's D loss fed the gate
    assert opened == [False, True]  # closed at the first step, open once a D loss <= the threshold was seen
    assert all(not torch.equal(d0[k], v) for k, v in system.discriminator.state_dict().items() if "weight" in k)
    assert any(not torch.equal(g0[k], v) for k, v in system.network.state_dict().items())


# -- through the command line ------------------------------------------------------------------------------------

def _recipe(tmp_path: Path, **method: object) -> dict:
    from medmodal.engine.plugin import get_method

    recipe = get_method("pumit").contract_recipe(3)
    recipe["data"]["cache_dir"] = str(tmp_path / "cache")
    recipe["method"].update(method)
    recipe["train"].update(val_every_steps=2, checkpoint_every_steps=2)
    return recipe


def _metrics(run: Path) -> dict[tuple[int, str], float]:
    with (run / "metrics.csv").open(newline="", encoding="utf-8") as f:
        return {(int(r["step"]), r["name"]): float(r["value"]) for r in csv.DictReader(f)}


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


class Crash(L.Callback):
    """Ctrl-C (SIGINT to this process) once training reaches ``at`` steps."""

    def __init__(self, at: int) -> None:
        self.at, self.sent = at, False

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


def test_gan_run_resumes_exactly(tmp_path: Path) -> None:
    """4 steps in one go = interrupted after 3 + ``--resume``: tokenizer, discriminator, both optimiser groups, the
    schedule and the gate (open from step 2 on, so a resume that forgot it would train step 4 without the
    adversarial term)."""
    from medmodal.engine.recipe import recipe_from_dict
    from medmodal.engine.run import RunError
    from medmodal.engine.train import train

    d = _recipe(tmp_path, **GAN, gan_gate=10.0, gan_weight=0.5)
    d["train"].update(max_steps=4, schedule="poly")
    train(recipe_from_dict(d), tmp_path / "whole")
    with pytest.raises(RunError, match="interrupted at step 3"):
        train(recipe_from_dict(d), tmp_path / "cut", callbacks=[Crash(at=3)])
    half = _ckpt(tmp_path / "cut")
    assert half["global_step"] == 3 and half[GATE_KEY]["current"] is not None
    train(None, tmp_path / "cut", resume=True)
    whole, cut = _ckpt(tmp_path / "whole"), _ckpt(tmp_path / "cut")
    assert whole["global_step"] == cut["global_step"] == 4
    assert whole[GATE_KEY] == cut[GATE_KEY] and whole[GATE_KEY] != half[GATE_KEY]
    a, b = whole["state_dict"], cut["state_dict"]
    assert a.keys() == b.keys() and any(k.startswith("discriminator.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert any(not torch.equal(half["state_dict"][k], a[k]) for k in a if k.startswith("discriminator."))
    groups = [len(g["params"]) for g in whole["optimizer_states"][0]["param_groups"]]
    assert len(groups) == 2 and groups[1] == len([k for k in a if k.startswith("discriminator.")])
    # the run's network is the tokenizer alone (what `--from` and the MIM stage load)
    assert not [k for k in load_file(str(tmp_path / "whole" / "weights" / "model.safetensors")) if "disc" in k]
    m = _metrics(tmp_path / "whole")
    assert m[(2, "train/gan_gate_open")] == 1.0 and m[(4, "train/gan_gate_open")] == 1.0
    assert m[(4, "train/d_loss")] >= 0.0 and (4, "train/g_adv") in m and (4, "train/d_loss_ema") in m
    assert 0 < m[(4, "val/code_usage")] <= 1 and 1 <= m[(4, "val/perplexity")] <= 16


def test_gan_on_two_processes_trains_as_on_one(tmp_path: Path) -> None:
    """The gate reads the D loss averaged over the processes, so 2 gloo processes gate and train as 1."""
    recipe = _recipe(tmp_path, **GAN, gan_gate=10.0)
    recipe["train"].update(max_steps=3, val_every_steps=3)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code, text = invoke("train", tmp_path / "r.yaml", "--out", tmp_path / "warm", "--set", "train.max_steps=1")
    assert code == 0, text  # builds the shared cache once
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("MASTER_PORT", None)
    for devices in (1, 2):
        out = subprocess.run([sys.executable, "-m", "medmodal.cli", "train", str(tmp_path / "r.yaml"), "--out",
                              str(tmp_path / f"run{devices}"), "--devices", str(devices)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = json.loads((tmp_path / "run2" / "distributed.json").read_text(encoding="utf-8"))["ranks"]
    assert ranks[0]["parameter_checksum"] == ranks[1]["parameter_checksum"]
    assert ranks[0]["val"] == ranks[1]["val"]
    # 1 and 2 processes agree to float noise (the tokenizer stage without GAN differs as much: about 1e-5 in L1,
    # 3e-4 relative in perplexity after 3 steps, Adam's first steps amplify rounding of near-zero gradients)
    one, two = _metrics(tmp_path / "run1"), _metrics(tmp_path / "run2")
    for name, value in ranks[0]["val"].items():
        assert value == pytest.approx(one[(3, name)], rel=1e-3), name
    assert two[(3, "train/gan_gate_open")] == one[(3, "train/gan_gate_open")] == 1.0
    assert two[(3, "train/d_loss")] == pytest.approx(one[(3, "train/d_loss")], rel=1e-3)
    g1, g2 = _ckpt(tmp_path / "run1")[GATE_KEY], _ckpt(tmp_path / "run2")[GATE_KEY]
    assert g2["ema"] == pytest.approx(g1["ema"], rel=1e-3) and g2["current"] == pytest.approx(g1["current"], rel=1e-3)


def test_lpips_and_bad_gan_settings_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_recipe(tmp_path, perceptual="lpips_vgg")), encoding="utf-8")
    code, text = invoke("train", tmp_path / "r.yaml", "--out", tmp_path / "run")
    assert code == 2 and "perceptual" in text and "download" in text and "Traceback" not in text, text
    assert not (tmp_path / "run" / "checkpoints").exists()
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(_recipe(tmp_path, gan=True, gan_channels=[8, 8, 8, 16])),
                                     encoding="utf-8")
    code, text = invoke("train", tmp_path / "d.yaml", "--out", tmp_path / "run2")
    assert code == 2 and "method.gan_channels" in text and "at most 3" in text, text
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(_recipe(tmp_path, gan=True, gan_channels=[8, 12])),
                                     encoding="utf-8")
    code, text = invoke("train", tmp_path / "g.yaml", "--out", tmp_path / "run3")
    assert code == 2 and "gan_channels" in text and "multiples of 8" in text, text


def test_codebook_counts_and_figure(tmp_path: Path) -> None:
    from medmodal.methods.pumit.figures import code_counts, plot_codebook

    probs = torch.zeros(2, 5, 3, 1, 1)
    probs[0, 1], probs[1, :, 0] = 1.0, 0.2  # crop 0: all code 1; crop 1: position 0 uniform -> code 0 (first max)
    probs[1, 4, 1:] = 1.0
    assert code_counts(probs).tolist() == [1, 3, 0, 0, 2]
    (tmp_path / "metrics.csv").write_text("step,name,value\n2,val/perplexity,3.5\n2,val/code_usage,0.25\n"
                                          "4,val/perplexity,5.0\n4,val/code_usage,0.5\n4,train/loss,1.0\n",
                                          encoding="utf-8")
    out = plot_codebook(tmp_path / "codebook.png", counts=code_counts(probs), metrics_csv=tmp_path / "metrics.csv",
                        title="run")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_codebook(tmp_path / "hist.png", counts=np.array([5, 0, 1]), metrics_csv=None, title="run")
    assert (tmp_path / "hist.png").stat().st_size > 0
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_codebook(tmp_path / "x.png", counts=None, metrics_csv=tmp_path / "none.csv", title="run")
