"""(c) Our DDPO step vs TRL 0.23.1's DDPOTrainer step on the same tiny SD1.5-style UNet pipeline, side by side.

    .venv/bin/python benchmarks/ddpo_vs_trl.py [--venv /tmp/trl-0.23.1-venv] [--repeats 3]

TRL 0.23.1 needs transformers 4.x, so it lives in its own venv, created here on first use (torch 2.13.0 CPU,
trl 0.23.1, diffusers 0.35.2, transformers 4.57.1, peft 0.17.1). The tiny pipeline is built by spatialscore and saved
as an ordinary diffusers directory both sides load. One "step" is what each library calls one epoch of DDPO:
sample `images` images with `steps` DDIM steps (eta 1, guidance 5), score them (mean brightness, the same
function), and train on every sampled step of every image with batch `batch` (TRL: `train_batch_size`, ours:
`train.micro_batch`), one inner epoch, LoRA r4 on the UNet's attention projections. Every figure is the median of
--repeats steps after a warm-up step; the report (JSON) gives seconds per step and ours / TRL.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TRL_PINS = ["torch==2.13.0", "trl==0.23.1", "diffusers==0.35.2", "transformers==4.57.1", "peft==0.17.1",
            "accelerate==1.10.1", "numpy<2.4", "protobuf"]

TRL_SCRIPT = textwrap.dedent('''
    import json, statistics, sys, time
    import torch
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    path, images, steps, batch, repeats, out = sys.argv[1:7]
    images, steps, batch, repeats = int(images), int(steps), int(batch), int(repeats)
    config = DDPOConfig(num_epochs=repeats + 1, sample_num_steps=steps, sample_eta=1.0, sample_guidance_scale=5.0,
                        sample_batch_size=images, sample_num_batches_per_epoch=1, train_batch_size=batch,
                        train_gradient_accumulation_steps=1, train_num_inner_epochs=1, train_timestep_fraction=1.0,
                        train_learning_rate=3e-4, train_clip_range=1e-4, train_adv_clip_max=5.0,
                        per_prompt_stat_tracking=False, mixed_precision="no", log_with=None, save_freq=10**6,
                        allow_tf32=False, train_use_8bit_adam=False, project_kwargs={"project_dir": out})
    from accelerate import PartialState

    PartialState()  # TRL's pipeline logs through accelerate's logger, which needs a state
    pipeline = DefaultDDPOStableDiffusionPipeline(path, use_lora=True)
    prompts = ["a red circle to the left of a blue star", "a green square above a yellow triangle"]
    counter = {"i": 0}

    def prompt_fn():
        counter["i"] += 1
        return prompts[counter["i"] % 2], {}

    def reward_fn(images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3)), {}

    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    times = []
    for epoch in range(repeats + 1):
        start = time.perf_counter()
        trainer.step(epoch, epoch)
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds_per_step": statistics.median(times[1:]), "all": times}))
''')


def trl_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"[bench] creating {venv} with {' '.join(TRL_PINS)} (a few minutes, once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *TRL_PINS],
                       check=True)
    return python


def ours(path: str, images: int, steps: int, batch: int, repeats: int) -> dict:
    from spatialscore.config import DdpoConfig, load_config
    from spatialscore.heads import RewardHead, RewardOutput, head_names, register_head
    from spatialscore.train.ddpo import train_ddpo

    if "bench_brightness" not in head_names():
        @register_head("bench_brightness")
        class Brightness(RewardHead):
            def score(self, images, prompts, meta):
                return RewardOutput(images.float().mean(dim=(1, 2, 3)))

    times = []
    with tempfile.TemporaryDirectory() as out:
        prompts = Path(out) / "prompts.txt"
        prompts.write_text("a red circle to the left of a blue star\na green square above a yellow triangle\n")
        for r in range(repeats + 1):
            cfg = load_config(DdpoConfig, None, [
                f"model.pipeline={path}", "model.lora_r=4", "model.lora_alpha=4",
                "model.lora_target_modules=[to_q,to_k,to_v,to_out.0]", "reward.heads={bench_brightness: 1.0}",
                f"prompts.file={prompts}", "prompts.eval_n=1", f"sample.steps={steps}", "sample.eta=1.0",
                "sample.guidance_scale=5.0", f"sample.group_size={images}", "sample.prompts_per_iter=1",
                f"sample.batch_size={images}", "sample.eval_steps=1", f"train.micro_batch={batch}",
                "train.per_prompt=false", "train.iterations=1", "train.eval_every=1000", "train.save_every=1000",
                "train.save_merged=false", f"train.seed={r}"])
            run = Path(out) / f"run{r}"
            train_ddpo(cfg, run, progress=False)
            row = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])
            times.append(row["seconds_sample"] + row["seconds_reward"] + row["seconds_train"])
    return {"seconds_per_step": statistics.median(times[1:]), "all": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default=str(Path(tempfile.gettempdir()) / "trl-0.23.1-venv"))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from spatialscore.models.generators import tiny_pipeline

    python = trl_python(Path(args.venv))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny-sd15"
        pipe = tiny_pipeline("sd15")
        pipe.save_pretrained(str(path), safe_serialization=True)
        # transformers 4 (TRL's side) reads CLIP's slow-tokenizer files, which transformers 5 no longer writes
        backend = json.loads(pipe.tokenizer.backend_tokenizer.to_str())["model"]
        (path / "tokenizer" / "vocab.json").write_text(json.dumps(backend["vocab"]))
        merges = [" ".join(m) if isinstance(m, list) else m for m in backend["merges"]]
        (path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        script = Path(tmp) / "trl_step.py"
        script.write_text(TRL_SCRIPT)
        done = subprocess.run([str(python), str(script), str(path), str(args.images), str(args.steps),
                               str(args.batch), str(args.repeats), str(Path(tmp) / "trl-out")],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
        mine = ours(str(path), args.images, args.steps, args.batch, args.repeats)
    report = {"images": args.images, "ddim_steps": args.steps, "train_batch": args.batch, "trl_0_23_1": theirs,
              "spatialscore": mine, "ratio_ours_over_trl": mine["seconds_per_step"] / theirs["seconds_per_step"],
              "target": "<= 1.0"}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
