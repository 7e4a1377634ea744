"""The typed configuration of an mmpretrain run: nested dataclasses, one docstring per field.

Every field has a default, so `ExperimentConfig()` is a complete (demo) configuration. YAML files
under `configs/` and dotted command-line overrides only change fields named here; `load.py`
rejects any key that is not a field below and any value of the wrong type.
A field's documentation is the string literal directly under it (read by `field_docs`).
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from typing import Iterator, Literal


@dataclass
class DataConfig:
    """Where image–text pairs come from and how they become batches."""

    source: Literal["demo", "shards", "synthetic"] = "demo"
    """`demo`: bundled handwritten digits (written to shards once); `shards`: `train_shards`;
    `synthetic`: random tensors generated per step (tests, benchmarks)."""
    train_shards: str = ""
    """Training shards: one or more sources joined by `::`, each a brace pattern of local tar
    files (`data/train-{000000..000099}.tar`) or of shell commands that write one tar to stdout
    (`pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -`). Example of a mix:
    `a/x-{000..099}.tar::pipe:curl -s http://host/y-{000..009}.tar` (see `train_weights`)."""
    train_weights: list[float] = field(default_factory=list)
    """Mixing weight of each source of `train_shards`, in order (resampled mode only): each
    sample comes from source i with probability weight_i / sum(weights), whatever the shard
    sizes. Empty: the sources mix as if they were one (by sample count, or by shard count when
    some count is unknown). Epoch mode reads every shard once per epoch, so its mix is fixed by
    the sources' sizes and it rejects weights."""
    train_manifests: list[str] = field(default_factory=list)
    """`manifest.json` (path or directory) of each source of `train_shards`, in order ('' for
    none): sample counts of `pipe:` shards, matched by the shard's file name. Local shards also
    use the manifest next to them. Empty: no manifests given."""
    mode: Literal["epoch", "resampled"] = "epoch"
    """`epoch`: every shard once per epoch, in an order shuffled by seed and epoch (needs a
    sample count for every shard and at least world_size x max(num_workers, 1) shards);
    `resampled`: an endless stream per (rank, worker) that draws shards with replacement,
    weighted by source weight and shard size (no minimum shard count, counts optional)."""
    epoch_samples: int = 0
    """Resampled mode: samples per epoch over all ranks (how often the shard draws and the
    shuffle buffer restart; a resume fast-forwards at most one epoch). 0: the sources' total
    sample count, which must then be known."""
    val_shards: str = ""
    """Held-out shards for evaluation (same format); empty means no held-out set."""
    cache_dir: str = ""
    """Where the demo dataset's shards are written (default: ~/.cache/mmpretrain)."""
    batch_size: int = 64
    """Micro-batch size per rank (samples per forward pass)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)."""
    shuffle_buffer: int = 512
    """Samples held in each worker's shuffle buffer."""
    tokenizer: str = ""
    """Directory or `tokenizer.json` of a fast Hugging Face tokenizer. Empty: fit a BPE tokenizer
    of `model.text.vocab_size` tokens on the training captions and save it in the run directory."""
    crop_scale_min: float = 0.8
    """Lower bound of the area fraction kept by RandomResizedCrop in the train transform."""
    fast_jpeg: bool = False
    """Decode training JPEGs with libjpeg's fast integer IDCT and fast chroma upsampling: ~25%
    faster decoding (~15% more samples/s per worker) for a mean error of ~1/255 per pixel after
    the crop and resize (docs/PERFORMANCE.md). Off: the exact (default libjpeg) decode."""
    max_bad_fraction: float = 0.01
    """Stop training when more than this fraction of the samples a rank has read were bad
    (corrupt image, missing or non-UTF-8 caption, truncated tar member; bad samples are skipped
    and counted in the `data_skipped_*` metrics). The fraction is taken over at least 1,000
    samples. 1: never stop for the fraction."""
    max_bad_in_a_row: int = 100
    """Stop training when this many consecutive samples of one DataLoader worker are bad
    (0: only at 100,000, so a stream of nothing but bad samples still never hangs)."""
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    """Per-channel mean used to normalize images (applied on the training device)."""
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    """Per-channel standard deviation used to normalize images."""


@dataclass
class VisionConfig:
    """The ViT image tower."""

    image_size: int = 32
    """Input resolution (square), in pixels."""
    patch_size: int = 4
    """Side of a square patch, in pixels; image_size must be a multiple of it."""
    width: int = 128
    """Transformer width (embedding dimension)."""
    layers: int = 4
    """Number of Transformer blocks."""
    heads: int = 4
    """Attention heads per block; width must be a multiple of it."""
    mlp_ratio: float = 4.0
    """MLP hidden size as a multiple of width."""
    pool: Literal["cls", "mean"] = "cls"
    """Pooling of the token outputs: the class token, or the mean of patch tokens."""


@dataclass
class TextConfig:
    """The causal text Transformer."""

    vocab_size: int = 1024
    """Size of the token embedding table; also the size of a BPE tokenizer fitted for the run."""
    context_length: int = 32
    """Tokens per caption after padding/truncation, start and end tokens included."""
    width: int = 128
    """Transformer width (embedding dimension)."""
    layers: int = 4
    """Number of Transformer blocks."""
    heads: int = 4
    """Attention heads per block; width must be a multiple of it."""
    mlp_ratio: float = 4.0
    """MLP hidden size as a multiple of width."""


@dataclass
class FusionConfig:
    """The multimodal part: a CoCa captioning decoder and/or a fusion head over the embeddings."""

    decoder: bool = False
    """Add a CoCa-style multimodal text decoder: its blocks take the text tower's token outputs
    through causal self-attention, cross-attention to the image tower's token outputs and an
    MLP, and predict the next caption token (trained with `loss.caption_weight`)."""
    width: int = 0
    """Decoder width (0: the text tower's width)."""
    layers: int = 4
    """Number of decoder blocks."""
    heads: int = 4
    """Attention heads of the decoder's self- and cross-attention (and of the pooler)."""
    mlp_ratio: float = 4.0
    """Decoder MLP hidden size as a multiple of its width."""
    pool_queries: int = 0
    """Attentional pooler: the image tokens are pooled to this many learned queries before the
    decoder attends to them (CoCa uses 256); 0: the decoder attends to every image token."""
    head: Literal["none", "concat", "weighted_sum", "gated"] = "none"
    """Fusion head for downstream use, combining the two L2-normalized embeddings of a pair
    (`model.fuse(images, tokens)`): `concat` (2 x embed_dim, no parameters), `weighted_sum`
    (one learned mixing weight), `gated` (a per-dimension gate computed from both embeddings).
    Not trained by the pretraining losses; fine-tune it downstream."""


@dataclass
class ModelConfig:
    """The two-tower model. `size` fills every field below that the config does not set."""

    size: str = "tiny"
    """Named size from the registry (`tiny`, `vit_b32`, `vit_b16`, `vit_l14`, `vit_h14`,
    `vit_g14`, `vit_bigg14`, `vit_e14`; with a CoCa decoder `coca_tiny`, `coca_vit_b32`,
    `coca_vit_b16`, `coca_vit_l14`), or empty to take every field from the config alone."""
    embed_dim: int = 128
    """Dimension of the shared image–text embedding space."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Image tower."""
    text: TextConfig = field(default_factory=TextConfig)
    """Text tower."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """Multimodal decoder (CoCa) and fusion head; off by default (a two-tower model)."""
    init_logit_scale: float = 2.6592600369262695
    """Initial log of the logit scale (CLIP: log(1/0.07); SigLIP: log(10))."""
    init_logit_bias: float = -10.0
    """Initial logit bias, used only by the SigLIP loss."""
    max_logit_scale: float = 100.0
    """The logit scale is clamped to at most this value."""
    attention: Literal["auto", "reference", "sdpa", "triton"] = "auto"
    """Attention implementation: `auto` picks by device (SDPA on CUDA, plain PyTorch on CPU;
    the fused Triton kernel where `attention_speeds` measured it faster, else opt-in); the
    others force one (`triton` on CPU only under `TRITON_INTERPRET=1`)."""
    attention_tiles: str = ""
    """Path of a `mmpretrain bench attention --sweep --json` file: the Triton kernel then uses
    the tiles and backward plan measured fastest there for attention calls of the same sequence
    lengths, head dim and causality (the built-in heuristics elsewhere). Empty: heuristics."""
    attention_speeds: str = ""
    """Path of a `mmpretrain bench attention --json` file: with `attention: auto` on CUDA, the
    fused Triton kernel takes the attention calls of the sequence lengths, head dim, causality
    and dtype it was measured faster than every SDPA backend there (fwd+bwd for training,
    fwd without gradients); SDPA elsewhere. Choices are logged when the file loads. Empty:
    SDPA on CUDA. A run's saved config whose file is missing (another machine) falls back
    to SDPA with a warning."""
    activation_checkpointing: bool = False
    """Recompute each Transformer block in the backward pass to save activation memory."""


@dataclass
class LossConfig:
    """The training objective."""

    kind: Literal["clip", "siglip"] = "clip"
    """`clip`: symmetric InfoNCE over the global batch; `siglip`: pairwise sigmoid loss."""
    gather_with_grad: bool = True
    """Let gradients flow through the cross-rank feature gather (exact gradients)."""
    local_loss: bool = False
    """Each rank computes only its own rows of the global logit matrix (less memory)."""
    fused: bool = False
    """Compute the contrastive loss in row chunks with a hand-written backward
    (`losses/fused.py`): the same values, but no (N, N) logit matrix is kept for the backward
    (plain CLIP keeps 8·N² bytes for a global batch of N, 8 GiB at N = 32,768, on every
    rank without `local_loss`)."""
    contrastive_weight: float = 1.0
    """Weight of the contrastive loss in the total loss (CoCa: 1)."""
    caption_weight: float = 2.0
    """Weight of the next-token captioning loss (only with `model.fusion.decoder`; CoCa: 2)."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    steps: int = 300
    """Optimizer steps to train for."""
    stop_after: int = 0
    """Stop (with a checkpoint) once this step is reached, leaving the schedule as if training
    ran to `steps`; a later job resumes and continues. 0: run to `steps`."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices; norms, biases, embeddings of size 1 and the logit
    scale/bias never decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 30
    """Linear warm-up steps from 0 to `lr`."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Shape of the learning rate after warm-up."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule as a fraction of `lr`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    impl: Literal["auto", "fused", "foreach", "loop"] = "auto"
    """How torch's AdamW runs the update: `fused` (one kernel for all parameters), `foreach`
    (a few multi-tensor kernels per operation) or `loop` (per parameter); `auto`: fused on
    CUDA, loop on CPU. The results agree to rounding; the choice is a speed lever."""
    max_skipped_steps: int = 10
    """Steps with a non-finite loss or gradient are skipped (no update) and counted; more than
    this many in a row stop the run with a checkpoint of the last good state."""


@dataclass
class EngineConfig:
    """How DeepSpeed runs the model: device, precision, ZeRO, accumulation."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when available, else CPU."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: bf16 on CUDA, fp32 on CPU."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage, 0 to 3."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO stage 1 or higher)."""
    offload_params: bool = False
    """Keep the 16-bit weights in CPU memory too, each gathered onto the device only while its
    module runs (ZeRO stage 3 with `offload_optimizer`): the device then holds little more than
    one layer's weights and the activations, at the cost of a host-to-device copy of every
    weight in the forward and the backward pass."""
    tf32: bool = False
    """Let CUDA run fp32 matrix multiplications on TF32 tensor cores (10-bit mantissa inputs,
    fp32 accumulation; `torch.backends.cuda.matmul.allow_tf32`). In bf16 runs that is the
    contrastive loss's fp32 logits, the only fp32 matmuls; in fp32 runs every matmul."""
    overlap_comm: Literal["auto"] | bool = "auto"
    """Overlap ZeRO's gradient reduction (and offload copies) with the backward pass
    (DeepSpeed's `overlap_comm`): a side stream and bucket bookkeeping that pay off only when
    there is a transfer to hide. DeepSpeed ends each overlapped backward with a device-wide
    synchronize; with contiguous gradients and no offload a stream wait replaces it (see
    `epilogue_sync`). `auto`: on CUDA only when there is a transfer to hide (more than one
    rank, or `offload_optimizer`); off for one GPU and on CPU."""
    contiguous_gradients: Literal["auto"] | bool = "auto"
    """ZeRO copies each gradient into a reduce bucket as it is produced, reduces the bucket and
    copies its share into one contiguous partition (DeepSpeed's `contiguous_gradients`): what
    feeds a reduce-scatter and offload copies, at three copies and a few dozen Python lines per
    parameter. `auto`: on with more than one rank, `offload_optimizer` or ZeRO-3; off for one
    rank of ZeRO-1/2, whose gradients are then flattened once for the optimizer. `false` on
    several CPU ranks is refused: DeepSpeed's plain path does not reduce CPU gradients."""
    epilogue_sync: bool = False
    """Keep DeepSpeed's device-wide synchronize at the end of every backward on the
    `overlap_comm` path (ZeRO-1/2 with contiguous gradients, no offload). By default a wait of
    the compute stream on the reduction stream orders the same data on the device while the
    host runs ahead (`engine/zero_epilogue.py`); `true` restores DeepSpeed's behaviour."""
    copy_stream: bool = True
    """Copy each batch to the GPU on a stream of its own, so that the copy overlaps the
    previous step's compute; on the compute stream it would run between two steps and add to
    each (`engine/copies.py`). No effect on CPU."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: `auto` is nccl on CUDA and gloo on CPU."""
    compile: bool = False
    """torch.compile the model (fuses LayerNorm, bias, GELU and residual adds between the
    matrix multiplications; ZeRO stage 0-2). The first steps take longer while it compiles."""
    compile_scope: Literal["auto", "model", "blocks"] = "auto"
    """What `engine.compile` compiles as one graph: `model`, the whole training forward (one
    compiled call per step each way: the least host work per step); `blocks`, each Transformer
    block on its own (faster compiles; each block's gradients reach ZeRO's reduction as its
    backward ends, so communication and offload copies overlap the backward, and checkpointed
    blocks keep only their inputs). `auto`: `model` on one rank without `offload_optimizer`
    and without `model.activation_checkpointing`, else `blocks`."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode: `reduce-overhead` replays each compiled graph's forward and
    backward as CUDA graphs (static shapes; fewer kernel launches from the host),
    `max-autotune[-no-cudagraphs]` also times Triton matmul templates against cuBLAS (much
    longer compiles)."""
    float8: Literal["off", "tensorwise", "rowwise", "rowwise_with_gw_hp"] = "off"
    """Run the Transformer blocks' linear layers on float8 tensor cores (torchao's recipes:
    `tensorwise` the fastest, `rowwise` per-row scales, `rowwise_with_gw_hp` the weight
    gradient in high precision; `engine/float8.py`). Needs an Ada/Hopper or newer GPU (CPU
    runs are allowed, for tests), bf16 or fp32 precision, `pip install 'mmpretrain[fp8]'`, and
    `engine.compile=true` to be fast. Weights, optimizer state and checkpoints are unchanged."""


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    every: int = 100
    """Save a checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 3
    """Keep this many newest checkpoints (0: keep all)."""
    resume: str = "auto"
    """`auto`: newest complete checkpoint of the run directory if any; `none`: start fresh;
    otherwise a checkpoint directory to resume from."""
    save_final: bool = True
    """Save a checkpoint when training ends."""


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl and wandb."""

    log_every: int = 10
    """Log metrics every this many steps."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; `offline` writes locally and needs no network or API key."""
    wandb_project: str = "mmpretrain"
    """wandb project name."""
    progress: bool = True
    """Show a progress bar when standard error is a terminal."""


@dataclass
class EvalConfig:
    """Evaluation during and after training (`mmpretrain eval` runs the same on a checkpoint)."""

    zeroshot: str = "auto"
    """Zero-shot classification: `digits` (the demo's held-out digits), `none`, `auto` (digits
    when data.source is demo, else none), or the path of a JSON/YAML file with `classnames`
    (list) and `templates` (list of prompts with one `{}`), scored on `zeroshot_shards`."""
    zeroshot_shards: str = ""
    """Labelled shards for a zero-shot classes file: each sample's json `label` is the index
    of its class in `classnames` (or its name). Empty: `data.val_shards`."""
    retrieval: bool = True
    """Image->text and text->image recall@1/5/10 on the held-out shards (`data.val_shards`, or
    the demo's held-out digits); several captions per image come from the json `captions`
    list. Skipped when there are no held-out shards."""
    caption_samples: int = 100
    """Fusion models: greedy captions are generated for this many held-out images (per run,
    spread over the ranks); with class names known (zero-shot set), the fraction of captions
    naming the right class and no other is reported. 0: no caption evaluation."""
    batch_size: int = 0
    """Evaluation batch size per rank (0: `data.batch_size`)."""
    every: int = 0
    """Evaluate every this many steps (0: only at the end)."""
    at_end: bool = True
    """Evaluate when training ends."""


@dataclass
class ExperimentConfig:
    """A whole run."""

    name: str = "demo"
    """Run name; the run directory is `output_dir/name`."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 0
    """Seed of model initialization, data order and augmentation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input data."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Training objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Distributed engine."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""


def field_docs(cls: type) -> dict[str, str]:
    """Return {field name: docstring} for a config dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def iter_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, Field, type]]:
    """Yield (dotted key, field, owning dataclass) for every leaf field of a config dataclass."""
    for f in fields(cls):
        factory = f.default_factory  # type: ignore[misc]
        if factory is not MISSING and is_dataclass(factory):
            yield from iter_fields(factory, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, cls
