"""Builds NVIDIA's own PyTorch AF2 (a checkout of github.com/NVIDIA/audio-flamingo, branch audio_flamingo_2, folder
inference_HF_pretrained/) at one of our model's sizes, with that model's weights, for `launch/benchmark.py compare`.

Nothing of NVIDIA's code is copied here: it is imported from the checkout at run time. The reference factory
`create_model_and_transforms` runs as inference.py calls it (cross-attention before every layer, no gradient
checkpointing, LM embeddings not frozen), after replacing only what needs the network, a GPU or a real checkpoint,
as the golden fixture did (shared/fixtures/af2_tiny/README.md):

- `factory.CLAP.__init__`: our equivalent without `torch.cuda.current_device()` / `.to('cuda:N')` and without
  `torch.load` of the CLAP checkpoint (the weights come later, from our export);
- `factory.create_htsat_model`: a direct `HTSAT_Swin_Transformer(...)` with our config's HTSAT sizes (same class);
- `factory.AutoTokenizer.from_pretrained`: a WordLevel `PreTrainedTokenizerFast` whose ids put `<|endoftext|>` and,
  once the factory has added them, `<audio>`, `<|endofchunk|>`, `<|PAD_TOKEN|>`, `<SEP>` at our config's ids;
- `factory.AutoModelForCausalLM.from_pretrained`: `Qwen2ForCausalLM(Qwen2Config(...))` from our LLM config;
- `torchvision` and `h5py` (imported, not used on this path) by stubs when absent; the laion_clap package
  `__init__`s (they import the unused CLAP text branch) are not executed: bare package modules are registered.

Our transformers is 5.x, not the 4.46.3 AF2 pins. One difference needed bridging: 5.x's `generate` drops an
all-ones attention mask, while `FlamingoLMMixin.forward` takes it as a required argument, so the extended LM's
forward gets a default of None and then calls the mixin's unchanged. (5.x's Qwen2Config takes `rope_theta` into
`rope_parameters` itself; the forward with `use_cache=False` and the state-dict keys are as in 4.46.3.) The reference needs torchaudio (its compiled extension may be moved away:
MelSpectrogram/AmplitudeToDB are plain torch), torchlibrosa and einops_exts: pass a folder holding them as
`deps` if they are not installed.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import os
import sys
import types

import numpy as np


def code_dir(checkout: str) -> str:
    """The inference_HF_pretrained folder of a checkout (or the folder itself)."""
    for candidate in (os.path.join(checkout, "inference_HF_pretrained"), checkout):
        if os.path.isfile(os.path.join(candidate, "src", "factory.py")):
            return os.path.abspath(candidate)
    raise FileNotFoundError(f"{checkout}: no inference_HF_pretrained/src/factory.py (a checkout of NVIDIA/audio-"
                            "flamingo, branch audio_flamingo_2, is expected)")


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package="__path__" in attrs)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _install_stubs(root: str) -> None:
    import transformers  # noqa: F401  (first: it probes for torchvision once, and must find the real one or none)

    try:
        import torchvision  # noqa: F401
    except ImportError:  # only Resize (windows longer than 10 s, never produced) and FrozenBatchNorm2d are named
        class Resize:
            def __init__(self, *args, **kwargs):
                raise RuntimeError("torchvision stub: Resize is only used for windows longer than 10 s")

        class FrozenBatchNorm2d:
            pass

        tv = _stub("torchvision")
        tv.transforms = _stub("torchvision.transforms", Resize=Resize)
        tv.ops = _stub("torchvision.ops")
        tv.ops.misc = _stub("torchvision.ops.misc", FrozenBatchNorm2d=FrozenBatchNorm2d)
    try:
        import h5py  # noqa: F401
    except ImportError:  # clap_module/utils.py imports it for dataset helpers the model never calls
        _stub("h5py")
    # bare packages: importing htsat.py must not run laion_clap's __init__ (text branch, training tools)
    package = ["my_laion_clap", "CLAP", "src", "laion_clap", "clap_module"]
    for depth in range(1, len(package) + 1):
        name = ".".join(package[:depth])
        if name not in sys.modules:
            _stub(name, __path__=[os.path.join(root, *package[:depth])])


def _tokenizer(config):
    """A tokenizer whose length after the factory's four additions is our vocabulary, with our special ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    base = config.audio_token_id  # the factory appends <audio>, <|endofchunk|>, <|PAD_TOKEN|>, <SEP> from here
    expected = dict(eoc_token_id=base + 1, pad_token_id=base + 2, sep_token_id=base + 3)
    wrong = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) != v}
    if wrong or config.llm.vocab_size != base + 4 or not 0 <= config.eos_token_id < base:
        raise ValueError(f"the reference factory assigns special ids audio, audio+1, +2, +3 and vocab audio+4; this "
                         f"model's differ ({wrong}, vocab {config.llm.vocab_size}, eos {config.eos_token_id})")
    vocab = {f"w{i}": i for i in range(base)}
    del vocab[f"w{config.eos_token_id}"]
    vocab["<|endoftext|>"] = config.eos_token_id
    backend = Tokenizer(WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="w0")


def _qwen2(config):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    llm = config.llm
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        head_dim=llm.head_dim, hidden_act="silu", max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta, tie_word_embeddings=llm.tie_word_embeddings,
        use_sliding_window=False, attention_dropout=0.0, bos_token_id=config.eos_token_id,
        eos_token_id=config.eos_token_id, attn_implementation="sdpa"))


@contextlib.contextmanager
def _patched(obj, **replacements):
    saved = {name: getattr(obj, name) for name in replacements}
    for name, value in replacements.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


def build(checkout: str, config, *, deps: str | None = None):
    """NVIDIA's Flamingo at our AF2Config's sizes (random weights, eval mode) and its tokenizer."""
    import torch

    root = code_dir(checkout)
    for path in (root, deps):
        if path and path not in sys.path:
            sys.path.insert(0, path)
    _install_stubs(root)
    factory = importlib.import_module("src.factory")
    htsat_module = importlib.import_module("my_laion_clap.CLAP.src.laion_clap.clap_module.htsat")
    h = config.htsat

    def create_htsat_model(audio_cfg, enable_fusion, fusion_type):
        audio_cfg.class_num, audio_cfg.mel_bins = h.num_classes, h.mel_bins
        return htsat_module.HTSAT_Swin_Transformer(
            spec_size=h.spec_size, patch_size=h.patch_size, patch_stride=(h.patch_stride, h.patch_stride),
            in_chans=h.in_chans, num_classes=h.num_classes, embed_dim=h.embed_dim, depths=list(h.depths),
            num_heads=list(h.num_heads), window_size=h.window_size, mlp_ratio=h.mlp_ratio, qkv_bias=h.qkv_bias,
            drop_path_rate=h.drop_path_rate, config=audio_cfg, enable_fusion=enable_fusion, fusion_type=fusion_type)

    def clap_init(self, clap_config):  # the original's steps minus the GPU and the checkpoint file
        torch.nn.Module.__init__(self)
        self.clap_config, self.method = clap_config, clap_config["method"]
        self.finetune = bool(clap_config.get("finetune"))
        self.nvclap = factory.create_htsat_model(factory.CLAPAudioCfp(), True, "aff_2d")
        for param in self.nvclap.parameters():
            param.requires_grad = self.finetune
        self.nvclap.train(self.finetune)

    tokenizer = _tokenizer(config)
    at = config.audio_transformer
    clap_config = dict(method="nvclap-large", audio_embed_dim=at.d_model, checkpoint=None, window_length=10.0,
                       window_overlap=0.0, max_num_window=config.max_windows, max_num_fewshot=1, finetune=True)
    kwargs = dict(n_head=at.n_heads, n_layers=at.n_layers, d_inner=at.d_inner, max_num_media=128,
                  max_window_per_audio=1, common_encoder_embed_dim=at.d_model)
    if at.d_k * at.n_heads != at.d_model or h.num_features != at.d_model:
        raise ValueError("the reference derives d_k = d_model / n_head and d_model = HTSAT's width")
    auto_tok = types.SimpleNamespace(from_pretrained=lambda *a, **k: tokenizer)
    auto_lm = types.SimpleNamespace(from_pretrained=lambda *a, **k: _qwen2(config))
    with _patched(factory, create_htsat_model=create_htsat_model, AutoTokenizer=auto_tok,
                  AutoModelForCausalLM=auto_lm), _patched(factory.CLAP, __init__=clap_init), \
            contextlib.redirect_stdout(sys.stderr):
        model, tokenizer = factory.create_model_and_transforms(
            clap_config=clap_config, lang_encoder_path="tiny", tokenizer_path="tiny",
            audio_transformer_kwargs=kwargs, cross_attn_every_n_layers=1, use_local_files=True,
            gradient_checkpointing=False, freeze_lm_embeddings=False)
    mixin_forward = importlib.import_module("src.flamingo_lm").FlamingoLMMixin.forward

    def forward(self, input_ids=None, attention_mask=None, **kwargs):  # 5.x generate drops an all-ones mask
        return mixin_forward(self, input_ids, attention_mask, **kwargs)

    type(model.lang_encoder).forward = forward  # the class extend_instance made for this one model
    if len(tokenizer) != config.llm.vocab_size:
        raise ValueError(f"reference tokenizer has {len(tokenizer)} tokens, the model {config.llm.vocab_size}")
    return model.eval(), tokenizer


def load_weights(model, tensors) -> None:
    """Our `export_state_dict` output (the reference's full state dict, aliases included) into the model,
    strictly: any key missing or left over is an error."""
    import torch

    state = {key: torch.from_numpy(np.array(value, order="C")) for key, value in tensors}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("rotary_emb.inv_freq")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"reference state dict mismatch: missing {missing[:8]} ({len(missing)}), unexpected "
                           f"{result.unexpected_keys[:8]} ({len(result.unexpected_keys)})")
