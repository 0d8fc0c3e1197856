"""Named remat policies (af2_jax/models/scan.py): each block tags its projections, a `save_*` policy keeps exactly
the tagged outputs it names (read from JAX's own list of saved residuals), and no policy changes the gradients."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from af2_jax.models import scan
from af2_jax.models.audio_transformer import EncoderLayer, audio_transformer_preset
from af2_jax.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, causal_attention_mask, qwen2_preset
from af2_jax.models.xattn import GatedCrossAttentionBlock, XAttnConfig

NAMED_POLICIES = ("save_qkv_proj", "save_out_proj", "save_qkv_out_proj", "save_mlp", "minimal")
SAVED = {"save_qkv_proj": {"query_proj", "key_proj", "value_proj"}, "save_out_proj": {"out_proj"},
         "save_qkv_out_proj": {"query_proj", "key_proj", "value_proj", "out_proj"},
         "save_mlp": {"mlp_in", "mlp_out"}, "minimal": {"query_proj", "key_proj", "value_proj", "out_proj",
                                                        "mlp_in", "mlp_out"}}


def _saved_names(fn, policy, args, capsys) -> set[str]:
    def loss(*a):
        return jnp.sum(jax.checkpoint(fn, policy=scan.REMAT_POLICIES[policy])(*a))

    capsys.readouterr()
    print_saved_residuals(loss, *args)
    return set(re.findall(r"named '(\w+)'", capsys.readouterr().out))


def _blocks():
    """(name, function of (weights, input), args) for an LLM superblock and an audio transformer layer."""
    rng = np.random.default_rng(0)
    llm = qwen2_preset("tiny")
    decoder = Qwen2DecoderLayer(llm, rngs=nnx.Rngs(0))
    xattn = GatedCrossAttentionBlock(XAttnConfig(dim=llm.hidden_size, dim_audio=32, heads=2, dim_head=16),
                                     rngs=nnx.Rngs(1))
    xattn.attn_gate[...] = jnp.ones((1,))
    xattn.ff_gate[...] = jnp.ones((1,))
    h = jnp.asarray(rng.normal(size=(2, 5, llm.hidden_size)), jnp.float32)
    media = jnp.asarray(rng.normal(size=(2, 7, 32)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    mask = causal_attention_mask(jnp.ones((2, 5), bool), 5)
    graph, state = nnx.split((xattn, decoder))

    def superblock(state, h):
        block, layer = nnx.merge(graph, state)
        h = block(h, block.audio_kv(media), jnp.ones((2, 7)))
        return layer(h, positions=positions, mask=mask)[0]

    at = EncoderLayer(audio_transformer_preset("tiny"), rngs=nnx.Rngs(2))
    at_graph, at_state = nnx.split(at)
    x = jnp.asarray(rng.normal(size=(2, 6, at.config.d_model)), jnp.float32)

    def audio_layer(state, x):
        return nnx.merge(at_graph, state)(x, jnp.ones((2, 6), bool), jnp.broadcast_to(jnp.arange(6), (2, 6)), None)

    return [("llm superblock", superblock, (state, h)), ("audio transformer layer", audio_layer, (at_state, x))]


@pytest.mark.parametrize("policy", NAMED_POLICIES)
def test_a_named_policy_saves_exactly_its_names(policy, capsys):
    for where, fn, args in _blocks():
        assert _saved_names(fn, policy, args, capsys) == SAVED[policy], where
    # 'full' keeps no named activation, 'none' (no checkpoint) is not a policy to test here
    for where, fn, args in _blocks():
        assert _saved_names(fn, "full", args, capsys) == set(), where


def test_named_policies_keep_the_gradients():
    """The tiny Qwen2 (3 scanned layers): loss and gradients with each policy equal those without remat."""
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 300, size=(2, 9)), jnp.int32)

    def loss_and_grad(policy):
        model = Qwen2ForCausalLM(qwen2_preset("tiny", remat_policy=policy), rngs=nnx.Rngs(0))
        graph, state = nnx.split(model)

        def loss(state):
            return jnp.mean(nnx.merge(graph, state)(ids)[0] ** 2)

        return jax.jit(jax.value_and_grad(loss))(state)

    base_loss, base_grad = loss_and_grad("none")
    for policy in NAMED_POLICIES:
        value, grad = loss_and_grad(policy)
        np.testing.assert_allclose(value, base_loss, rtol=1e-6)
        for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(base_grad)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_unknown_remat_name_is_refused():
    with pytest.raises(ValueError, match="unknown remat name"):
        scan.tag(jnp.ones(2), "attention_probs")
