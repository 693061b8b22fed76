"""The configuration tree: plain dataclasses turned into OmegaConf structured configs.

Field names follow the specification documents (NeMo's keys) wherever those exist, so a YAML block copied from
them loads as is. Keys the documents use that have a PyTorch-native home elsewhere in this tree (for example
``model.tensor_model_parallel_size``) are listed in ``vlkit.config.compat`` and moved there on load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

# OpenAI CLIP's normalisation constants: the default for every image tower unless a config says otherwise.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TransformerConfig:
    """Fields shared by every transformer tower (vision, text, LLM)."""

    num_layers: int = 12
    hidden_size: int = 768
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size
    num_attention_heads: int = 12
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    # gelu | quick_gelu | gelu_tanh | relu | swiglu. OpenAI checkpoints use quick_gelu: it belongs to the checkpoint.
    activation: str = "gelu"
    normalization: str = "layernorm"  # layernorm | rmsnorm
    layernorm_epsilon: float = 1e-5
    bias: bool = True  # biases in the attention and MLP projections
    encoder_seq_length: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    output_dim: Optional[int] = None  # projection to the shared embedding space; None: no projection
    # Activation checkpointing with the documents' semantics; applied from outside the model by vlkit.parallel.
    activations_checkpoint_granularity: Optional[str] = None  # None | full | selective
    activations_checkpoint_method: Optional[str] = None  # block | uniform
    activations_checkpoint_num_layers: Optional[int] = None
    # SDPA is always used; True asks the trainer to restrict it to the flash kernel when the device supports it.
    use_flash_attention: bool = False

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class VisionConfig(TransformerConfig):
    patch_dim: int = 16
    img_h: int = 224
    img_w: int = 224
    image_mean: Optional[list[float]] = None  # None: OpenAI CLIP's values
    image_std: Optional[list[float]] = None
    num_channels: int = 3
    drop_patch_rate: float = 0.0
    global_average_pool: bool = False
    class_token_length: int = 1
    pre_norm: bool = True  # a LayerNorm after the embeddings (CLIP's ln_pre); classic ViT classifiers have none
    patch_bias: bool = False  # bias on the patch-embedding convolution (CLIP: none; timm/NeMo ViT: yes)
    # Eval preprocessing: OpenAI/open_clip's resize + centre crop, or Hugging Face CLIPImageProcessor's (differs by a
    # pixel of crop offset on some sizes). Belongs to the checkpoint: converters carry it.
    crop_style: str = "openai"  # openai | hf
    resize_interpolation: str = "bicubic"  # bicubic | bilinear

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.img_h // self.patch_dim, self.img_w // self.patch_dim

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.image_mean) if self.image_mean is not None else OPENAI_CLIP_MEAN

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.image_std) if self.image_std is not None else OPENAI_CLIP_STD


@dataclass
class TextConfig(TransformerConfig):
    num_layers: int = 12
    hidden_size: int = 512
    num_attention_heads: int = 8
    encoder_seq_length: Optional[int] = 77  # the context length
    vocab_size: int = 49408
    pooling: str = "eot"  # eot (OpenAI CLIP and every public checkpoint) | first
    eot_token_id: int = 49407
    pad_token_id: int = 0
    causal: bool = True
    tokenizer: str = "clip"


@dataclass
class LLMConfig(TransformerConfig):
    """LLaMA-architecture decoder (model.arch=llama on its own, NeVA's language model). ``encoder_seq_length`` is the
    context length; ``layernorm_epsilon`` is the RMSNorm epsilon (LLaMA-2: 1e-5)."""

    activation: str = "swiglu"
    normalization: str = "rmsnorm"
    bias: bool = False
    encoder_seq_length: Optional[int] = 4096
    num_query_groups: Optional[int] = None  # grouped-query attention; None: as many as heads
    vocab_size: int = 32000
    rotary_base: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    share_embeddings_and_output_weights: bool = False
    position_embedding_type: str = "rope"
    ffn_dropout: float = 0.0
    # Special tokens of the checkpoint (Hugging Face's config carries them): generation stops at any eos id.
    bos_token_id: Optional[int] = 1
    eos_token_ids: list[int] = field(default_factory=lambda: [2])
    pad_token_id: Optional[int] = None
    # Its tokenizer: a tokenizer.json or a directory holding one. None: mm_cfg.llm.from_pretrained's directory (NeVA).
    tokenizer: Optional[str] = None


@dataclass
class MMLLMConfig:
    """``model.mm_cfg.llm``: where NeVA's language model comes from and whether it trains (its architecture is
    ``model.llm``)."""

    from_pretrained: Optional[str] = None  # a Hugging Face LlamaForCausalLM or vlkit llama/NeVA directory
    freeze: bool = False
    model_type: str = "llama_2"  # nvgpt | llama_2 | llama_3 | vicuna_v1: the default conversation template


@dataclass
class MMVisionEncoderConfig:
    """``model.mm_cfg.vision_encoder``: NeVA's image tower (its architecture is ``model.vision``), the layer it is read
    at and whether it trains."""

    from_pretrained: Optional[str] = None  # a Hugging Face CLIP, open_clip or vlkit directory (or a cached Hub id)
    from_hf: bool = False  # from_pretrained may name a Hugging Face Hub id found in the local cache
    # The document's declarations of the tower; None: whatever it has. Set, they must match it.
    patch_dim: Optional[int] = None
    hidden_size: Optional[int] = None
    vision_select_layer: int = -2  # transformers' hidden_states index: -2 is the penultimate block's output
    class_token_length: int = 1  # leading (class) tokens dropped from the features
    freeze: bool = True
    crop_size: Optional[list[int]] = None  # [h, w] the tower runs at; None: its own (model.vision.img_h/img_w)


@dataclass
class MMConfig:
    """``model.mm_cfg``: NeVA's multimodal block (NeMo's keys)."""

    llm: MMLLMConfig = field(default_factory=MMLLMConfig)
    vision_encoder: MMVisionEncoderConfig = field(default_factory=MMVisionEncoderConfig)
    mm_mlp_adapter_type: str = "linear"  # linear | mlp2x_gelu (LLaVA-1.5) | mlpNx_gelu
    use_im_start_end: bool = False  # learned start / end embeddings around each image's features
    pretrain_mm_mlp_adapter: Optional[str] = None  # stage-1 weights for the projector (a checkpoint or file)


@dataclass
class LoRAConfig:
    """``model.peft.lora``: low-rank adapters on the projections of the transformer blocks (vlkit.nn.lora)."""

    rank: int = 0  # 0: off
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input
    # Projections by vlkit's names: qkv (fused), proj, gate / up / down (SwiGLU), fc1 / fc2 (GELU MLP). A bare name
    # applies to the LLM (NeVA) or to both towers (CLIP); "<tower>.<name>" to that tower (vision_tower.qkv, text.fc1).
    # None: every attention and MLP projection there (NeVA's LLaMA: qkv, proj, gate, up, down; CLIP: qkv, proj, fc1,
    # fc2); see vlkit.config.validate.lora_targets.
    target_modules: list[str] | None = None


@dataclass
class PeftConfig:
    """``model.peft``: parameter-efficient fine-tuning. Base weights frozen; only the adapters train and are saved."""

    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class ModelConfig:
    arch: str = "clip"  # clip | vit_classifier | llama | neva
    output_dim: int = 512
    # Contrastive loss wiring (CLIP); the semantics are open_clip's.
    local_loss: bool = False
    gather_with_grad: bool = True
    loss_impl: str = "auto"  # auto | naive | tiled | fused | ring
    # Locked towers (LiT, open_clip's flags): frozen weights, eval mode, no optimizer state.
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0  # with lock_image: train the last N blocks (plus final norm and projection)
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    # Classification head (vit_classifier).
    vision_pretraining_type: str = "classify"
    num_classes: int = 1000
    label_smoothing: float = 0.0  # cross-entropy target smoothing (folded into mixup's soft targets)
    linear_probe: bool = False  # train the head only: backbone frozen, in eval mode, out of the optimizer
    init_from: Optional[str] = None  # start from a model dir / checkpoint (a classifier, or a CLIP's .visual tower)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: Optional[TextConfig] = None
    llm: Optional[LLMConfig] = None
    mm_cfg: Optional[MMConfig] = None  # NeVA's multimodal block (model.arch=neva; filled with defaults)
    peft: Optional[PeftConfig] = None  # LoRA (model.peft.lora.rank > 0): NeVA's LLM, CLIP's towers


@dataclass
class DataConfig:
    # synthetic_shapes | synthetic_shapes_vqa | webdataset | csv | imagefolder | llava
    kind: str = "synthetic_shapes"
    train_path: Optional[str] = None
    val_path: Optional[str] = None
    dataset_size: Optional[int] = None  # samples per epoch for shard datasets without sizes.json
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = False
    image_key: str = "jpg;jpeg;png;webp"
    text_key: str = "txt"
    # CLIP's RandomResizedCrop area range (open_clip's aug_cfg scale); None: no random crop (resize + centre crop)
    clip_crop_scale: Optional[list[float]] = field(default_factory=lambda: [0.9, 1.0])
    # Classification augmentation (the classify task; timm's names).
    # RandomResizedCrop's area range; None: no random crop (the eval resize + centre crop)
    crop_scale: Optional[list[float]] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.0  # horizontal flip probability
    auto_augment: Optional[str] = None  # rand | rand-m9-n2 | auto | auto-imagenet | auto-cifar10 | auto-svhn | trivial
    reprob: float = 0.0  # random erasing probability (per-pixel noise, after normalisation)
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    mixup_prob: float = 1.0  # probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # with both on: probability of cutmix instead of mixup
    # LLaVA conversations (kind=llava, NeVA); NeMo's neva data keys.
    conv_template: Optional[str] = None  # plain | vicuna_v1 | llama_2 | nvgpt | llama_3; None: the LLM's model_type
    image_folder: Optional[str] = None  # image paths are relative to it; None: the data file's folder
    image_aspect_ratio: str = "square"  # square | pad | keep
    is_multimodal: bool = True  # False: images dropped, <image> placeholders removed
    lazy_preprocess: bool = True  # tokenise when read (False: all up front, problems counted before training)
    sep_image_conv_front: bool = False  # move <image> to the front of the first human turn
    system_prompt: Optional[str] = None  # None: the template's default; "" for none. A sample's own "system" wins


@dataclass
class OptimConfig:
    # adamw | adam | sgd | adafactor. NeMo's "distributed_fused_adam" is accepted: adamw with FSDP-sharded state.
    name: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    momentum: float = 0.9
    fused: Optional[bool] = None  # None: fused kernels when the device supports them
    decay_norm_and_bias: bool = False  # biases, norms, embeddings' gains and logit_scale are never decayed by default
    layer_decay: Optional[float] = None  # layer-wise lr decay for fine-tuning


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    min_lr: float = 0.0
    max_steps: Optional[int] = None  # None: trainer.max_steps


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None: <trainer.output_dir>/checkpoints
    every_n_steps: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: Optional[str] = None  # a checkpoint directory, or "auto" for the latest under dir
    # Start a new run (step 0, fresh optimizer, schedule and data position) from the resumed checkpoint's weights
    # only: a config that changes more than hyper-parameters may then differ from the checkpoint's.
    weights_only: bool = False


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    jsonl: bool = True
    log_every_n_steps: int = 10


@dataclass
class TrainerConfig:
    precision: str = "fp32"  # fp32 | bf16 | fp16 (NeMo's 32, 16, bf16, bf16-mixed, 16-mixed are accepted)
    amp_O2: bool = False  # bf16 parameters with fp32 master weights and reductions (NeMo's megatron_amp_O2)
    max_steps: int = 1000
    max_epochs: Optional[int] = None
    micro_batch_size: int = 32  # per process
    global_batch_size: Optional[int] = None  # None: micro_batch_size * data-parallel size (no accumulation)
    gradient_clip_val: Optional[float] = None
    gradient_cache: bool = False  # Inf-CL: one contrastive loss over all micro-batches of the global batch, exactly
    max_nonfinite_steps: int = 10  # a NaN/Inf loss skips the step; this many in a row aborts the run
    collective_timeout_s: float = 600.0  # a dead rank makes the others fail after this, instead of hanging
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None: known GPUs only (no MFU on unknown ones)
    val_check_interval: int = 0
    ema_decay: Optional[float] = None  # exponential moving average of the weights (any task); None: off
    seed: int = 0
    devices: Any = "auto"
    num_nodes: int = 1
    accelerator: str = "auto"  # auto | cpu | cuda
    output_dir: str = "runs/${name}"
    # A fresh run into an output_dir that holds another run moves that run aside (to <output_dir>.old-<time>).
    overwrite: bool = False
    save_model: bool = True  # at the end, write the whole trained model to <output_dir>/model (any parallel layout)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class ParallelConfig:
    data_parallel: str = "auto"  # auto | none | ddp | fsdp
    fsdp: Optional[bool] = None  # shorthand: true sets data_parallel=fsdp, false turns fsdp into ddp
    tensor_parallel_size: int = 1
    fsdp_reshard_after_forward: bool = True
    compile: bool = False  # torch.compile per transformer block


@dataclass
class Config:
    name: str = "vlkit"
    data_dir: str = "data"  # what the documents' ${data_dir}/... paths are relative to (NeMo's launcher variable)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
