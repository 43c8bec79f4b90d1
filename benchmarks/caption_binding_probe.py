"""Does the text encoder tell which object a colour belongs to? A linear probe per encoder layer.

Two-object prompts ("a red circle in the top left and a blue square in the bottom right") need the
denoiser to bind each colour to its object's place. This probe asks whether the encoder's token
states carry that binding: from the hidden state of the *second* object's colour word alone, a
linear classifier (trained on two thirds of the captions, scored on the rest) predicts that
object's position (5 classes, chance 20%). If the last layer — what prx feeds the model — decodes
it well, the encoder is not what keeps two-object scenes from binding; the denoiser's training is.

    python benchmarks/caption_binding_probe.py                 # the bundled MiniLM, 3000 captions
    python benchmarks/caption_binding_probe.py --encoder DIR   # any local BERT-like encoder
"""

import argparse

import numpy as np
import torch

from prx.data.shapes import POSITIONS, ShapesWorld
from prx.text import resolve_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="minilm", help="'minilm' (bundled), a local directory or a hub id")
    ap.add_argument("--captions", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    path = resolve_encoder(args.encoder)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).eval()
    world = ShapesWorld(split="train", object_count_weights=(0, 1, 0))  # two-object scenes only
    states: list[list[np.ndarray]] = []
    labels = []
    index = 0
    while len(labels) < args.captions:
        scene = world.scene(index)
        index += 1
        first, second = scene.spec.objects
        if scene.spec.relation is not None or first.color == second.color:
            continue  # positional captions with two colours: the colour word names one object
        caption = scene.caption.split(": ")[-1]  # without a "two shapes: " prefix
        tokens = tokenizer(caption, return_tensors="pt")
        words = tokenizer.convert_ids_to_tokens(tokens["input_ids"][0].tolist())
        if second.color not in words:
            continue
        j = len(words) - 1 - words[::-1].index(second.color)
        with torch.no_grad():
            hidden = encoder(**tokens, output_hidden_states=True).hidden_states
        states.append([h[0, j].numpy() for h in hidden])
        labels.append(POSITIONS.index(second.position))
    y = torch.tensor(labels)
    train, test = slice(0, len(y) * 2 // 3), slice(len(y) * 2 // 3, len(y))
    print(f"{len(y)} two-object captions; position of the second object from its colour word's state (chance 20%)")
    for layer in range(len(states[0])):
        x = torch.tensor(np.stack([s[layer] for s in states]))
        x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
        probe = torch.nn.Linear(x.shape[1], len(POSITIONS))
        opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe(x[train]), y[train]).backward()
            opt.step()
        accuracy = (probe(x[test]).argmax(1) == y[test]).float().mean().item()
        name = "embeddings" if layer == 0 else f"layer {layer}" + (" (what prx uses)" if layer == len(states[0]) - 1 else "")
        print(f"  {name:<26} {accuracy:6.1%}")


if __name__ == "__main__":
    main()
