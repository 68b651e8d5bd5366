"""A tiny text-to-image DiT on the bundled digits, in pixel space (8x8): captions "the digit seven".

    ldm-jax train --config=configs/t2i_digits.py --workdir=/tmp/t2i_digits \
        --config.text.encoder_path=<sd>/text_encoder --config.text.tokenizer_path=<sd>/tokenizer
    ldm-jax sample --config=configs/t2i_digits.py --workdir=/tmp/t2i_digits (same text flags) \
        --prompt="the digit three" --prompt="the digit eight"

No CLIP weights ship with the package: give a CLIP text encoder (a Stable Diffusion repo's
`text_encoder/` + `tokenizer/`, or a CLIPTextEncoder bundle) and set model.context_dim and
model.pooled_dim to its width (768 for SD 1.x's CLIP ViT-L/14, the default here). Even a
random-weight CLIP separates these captions (the tests train on one).
"""
from ldm_jax.config import default_config

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def get_config():
    config = default_config()
    config.data.update(source="digits", image_size=8, batch_size=64, random_flip=False, num_threads=2,
                       caption_template="the digit {name}", caption_class_names=DIGIT_NAMES)
    # Text only (num_classes=0): cross-attention to the caption's tokens + its pooled vector added to
    # the timestep embedding; class_dropout_prob is the caption dropout (classifier-free guidance).
    config.model = dict(
        input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=3, num_heads=4,
        num_classes=0, class_dropout_prob=0.1, learn_sigma=False, context_dim=768, pooled_dim=768,
    )
    config.text.update(max_length=16)  # "the digit seven" is a handful of tokens
    config.diffusion.update(prediction="v", beta_schedule="cosine")
    config.optimizer.update(learning_rate=2e-3, warmup_steps=50, grad_clip_norm=1.0)
    config.ema.update(decay=0.995, warmup=True)
    config.train.update(num_steps=800, log_every=100, checkpoint_every=800, preview_every=800)
    config.sample.update(sampler="ddim", num_steps=25, guidance_scale=3.0, grid_rows=10, grid_cols=10,
                         prompts=tuple(f"the digit {name}" for name in DIGIT_NAMES))
    return config
