"""A randomly initialised transformers LLaVA directory with the shapes-vqa tokenizer, for ``vlkit bench serve --hf``:
the same weights served by vlkit (which reads LLaVA directories) and run by transformers' ``generate``.

``python tools/hf_llava_for_bench.py OUT [--hidden 512 --layers 8 --vision-hidden 256 --vision-layers 6 --image 64]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vlkit.data.shapes_vqa import write_shapes_vqa


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vision-hidden", type=int, default=256)
    p.add_argument("--vision-layers", type=int, default=6)
    p.add_argument("--image", type=int, default=64, help="image side (patch 8)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_shapes_vqa(tmp, train=8, val=2, progress=False)
        tokenizer = Path(tmp) / "tokenizer"
        vocab = json.loads((tokenizer / "tokenizer.json").read_text())
        size = max([*vocab["model"]["vocab"].values(), *(t["id"] for t in vocab.get("added_tokens", []))]) + 1
        torch.manual_seed(0)
        vision = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                                  num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_hidden // 64,
                                  image_size=args.image, patch_size=8)  # fmt: skip
        text = LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=int(2.75 * args.hidden),
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 128,
            vocab_size=size + 1,  # the image token's id comes after the tokenizer's
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=size,
                             image_seq_length=(args.image // 8) ** 2)  # fmt: skip
        model = LlavaForConditionalGeneration(config).eval()
        model.save_pretrained(args.out)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer / name, args.out / name)
    processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": args.image},
                 "resample": 3, "do_center_crop": True, "crop_size": {"height": args.image, "width": args.image},
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.48145466, 0.4578275, 0.40821073],
                 "image_std": [0.26862954, 0.26130258, 0.27577711]}  # fmt: skip
    (args.out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    print(f"{args.out}: LLaVA, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
