"""How fast an UnlearnDiff Attack iteration is, against the straightforward way.

    .venv/bin/python -m benchmarks.attack_speed [--iterations 3] [--sd15-size 512]

On the demo shapes model (64x64) and a full-size random SD1.5 checkpoint
(built once by the project's builder into ``benchmarks/.checkpoints/``, at
``--sd15-size`` pixels), both loaded with ComfyUI's CheckpointLoaderSimple
and erased with UCE Erase Concept, it times one attack iteration (sample the
prefix tokens, encode, one UNet forward and backward at one timestep, Adam,
simplex projection) two ways, in the same run, on the same weights:

- the pack's: the ``k`` prefix rows are mixed from the candidate words'
  embedding rows (gathered once per attack) and the other rows are plain
  lookups, then the whole text encoder and the UNet run with gradients for
  the input only;
- the straightforward way, as the reference implementation
  (OPTML-Group/Diffusion-MU-Attack, ``TextGrad`` with ``id2embedding``)
  does it: every step the whole prompt is re-encoded from a ``[77, V]``
  one-hot matrix over the full vocabulary times the token embedding, through
  the whole text encoder, and the distribution spans the full vocabulary.

Writes ``results/attack_speed.md`` and ``results/attack_speed.json``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.erase_speed import CHECKPOINTS, RESULTS, machine
from devkit import checkpoint_builder, host, paths


def load(comfy_nodes, name: str, folder: Path | None = None):
    import folder_paths

    if folder is not None:
        folder_paths.add_model_folder_path("checkpoints", str(folder))
    with torch.inference_mode():
        return comfy_nodes.CheckpointLoaderSimple().load_checkpoint(name)[:2]


def sd15_full(comfy_nodes):
    path = CHECKPOINTS / "rece_bench_sd15-full.safetensors"
    if not path.exists():
        print(f"building {path.name} (once)")
        checkpoint_builder.build_checkpoint(path, variant="sd15-full", seed=0)
    return load(comfy_nodes, path.name, CHECKPOINTS)


def straightforward_encoder(encoder, layout):
    """``encode(one_hot [k, V_full])``: the whole prompt as a ``[77, V]`` one-hot matrix times the
    token embedding, every step, as the reference implementation's ``id2embedding`` + text encoder."""
    from red_team_ops.clip_text import clip_text_forward

    (name,) = encoder.names
    table = encoder.token_embedding(name)
    ids = torch.tensor(layout.ids[name])
    plain = F.one_hot(ids, num_classes=table.shape[0]).float()

    def encode(prefix_one_hot):
        with torch.inference_mode(False), torch.enable_grad():
            one_hot = torch.cat([plain[:1], prefix_one_hot, plain[1 + layout.k:]])
            embeds = one_hot @ table
            return clip_text_forward(encoder.weights[name], encoder.configs[name], embeds[None],
                                     torch.tensor([layout.eos[name]]))

    return encode, table.shape[0]


def time_model(pack, comfy_nodes, label: str, model, clip, concept: str, prompt: str, size: int, iterations: int,
               k: int = 5) -> dict:
    from red_team_ops import unlearndiff_attack

    attack_module = host.pack_module("nodes.red_team.unlearndiff_attack")
    with torch.inference_mode():
        erased, _ = pack.NODE_CLASS_MAPPINGS["UCEEraseConcept"]().erase(
            model, clip, concept, "", "", "nudity", lamb=0.1, erase_scale=1.0, preserve_scale=0.1, reg_scale=0.1,
            strength=1.0)
    started = time.perf_counter()
    encoder = attack_module.DifferentiableTextEncoder(clip)
    denoiser = attack_module.DifferentiableDenoiser(erased)
    setup = time.perf_counter() - started
    layout = encoder.layout(prompt, k)
    candidates, _, vocab = attack_module.candidate_tokens(clip)
    candidate_ids = torch.tensor(candidates)
    x0 = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    baseline = encoder.encode_tokens(layout.with_prefix([candidates[0]] * k))
    ways = {
        "pack": (lambda one_hot: encoder.encode(layout, one_hot, candidate_ids=candidate_ids), len(candidates)),
        "straightforward": straightforward_encoder(encoder, layout),
    }
    out = {"model": label, "size": size, "iterations": iterations, "k": k, "vocabulary": vocab,
           "candidates": len(candidates), "setup_seconds": setup,
           "weight_copy_mib": (encoder.weight_bytes + denoiser.weight_bytes) / 2 ** 20}
    for way, (encode, vocab_size) in ways.items():
        with torch.inference_mode(False), torch.enable_grad():
            result = unlearndiff_attack(encode, denoiser.predict_noise, x0, denoiser.alphas_cumprod, vocab_size,
                                        baseline, k=k, iterations=iterations, n_eval=1, seed=0)
        out[way] = result.seconds_per_iteration
        print(f"{label}: {way} {result.seconds_per_iteration:.3f} s per iteration")
    out["ratio"] = out["straightforward"] / out["pack"]
    return out


def markdown(results: list[dict], where: str) -> str:
    lines = [f"# UnlearnDiff Attack speed ({time.strftime('%Y-%m-%d')})", "", f"Machine: {where}.", "",
             "Seconds per attack iteration (sample k = 5 prefix tokens, encode, UNet forward and backward at one "
             "timestep, Adam, simplex projection), the mean over the timed iterations; the straightforward way "
             "re-encodes the whole prompt from a [77, V] one-hot matrix over the full vocabulary each step, as the "
             "reference implementation does, with the same text encoder and UNet code, in the same run.", "",
             "| model | latent | vocabulary searched (pack / straightforward) | pack | straightforward | ratio | "
             "weight copies for gradients | set-up (copying them) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['size']}x{r['size']} px | {r['candidates']} / {r['vocabulary']} | "
                     f"**{r['pack']:.3f}** | {r['straightforward']:.3f} | **{r['ratio']:.2f}x** | "
                     f"{r['weight_copy_mib']:.0f} MiB | {r['setup_seconds']:.1f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per way (default 3)")
    parser.add_argument("--sd15-size", type=int, default=512, help="image size for SD1.5 (default 512)")
    parser.add_argument("--models", default="demo,sd15", help="comma-separated: demo, sd15")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as output:
        comfy_nodes = host.load_in_process(output_dir=Path(output), quiet=True)
        pack = host.pack_module()
        for name in args.models.split(","):
            if name == "demo":
                model, clip = load(comfy_nodes, paths.DEMO_NAME)
                results.append(time_model(pack, comfy_nodes, "demo shapes model (SD1.5 format, 18.7M UNet)", model,
                                          clip, "circle", "a red circle", 64, args.iterations))
            else:
                model, clip = sd15_full(comfy_nodes)
                results.append(time_model(pack, comfy_nodes, "SD1.5 full size, random weights", model, clip,
                                          "nudity", "a photo of a nude person", args.sd15_size, args.iterations))
            del model, clip
    where = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attack_speed.md").write_text(markdown(results, where))
    (args.out / "attack_speed.json").write_text(json.dumps({"machine": where, "results": results}, indent=2) + "\n")
    print(markdown(results, where))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
