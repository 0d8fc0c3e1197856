"""af2-jax: Audio Flamingo 2 in JAX/Flax NNX."""
import flax

# Parameters carry *logical* axis names ('embed', 'mlp', ...), which only become mesh axes through the rules
# table in af2_jax.sharding. Flax's eager sharding would try to place them at creation time and demands a mesh
# context even on a laptop, so we switch it off and apply shardings explicitly (jit out_shardings / device_put).
flax.config.update("flax_always_shard_variable", False)
