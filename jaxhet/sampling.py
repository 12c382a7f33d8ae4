"""Next-token sampling with per-row settings, so one batch can mix greedy, temperature, top-k and top-p requests.

Shared by the simple generator (`jaxhet.generate`, one setting for the whole batch) and the serving engine (a
setting per request in the running batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray


def filter_logits(
    logits: Float[Array, "batch vocab"],
    temperature: Float[Array, " batch"],
    top_k: Int[Array, " batch"],
    top_p: Float[Array, " batch"],
) -> Float[Array, "batch vocab"]:
    """Temperature-scaled logits with everything outside each row's top-k / top-p set at -inf.

    `top_k` 0 and `top_p` 1 switch that filter off; rows with temperature 0 are greedy and ignore this.
    """
    vocab = logits.shape[-1]
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    descending = jnp.sort(scaled, axis=-1)[:, ::-1]
    kth = jnp.take_along_axis(descending, (jnp.clip(top_k, 1, vocab) - 1)[:, None], axis=-1)
    kth = jnp.where(top_k[:, None] > 0, kth, -jnp.inf)
    descending = jnp.where(descending < kth, -jnp.inf, descending)
    probs = jax.nn.softmax(descending, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token is kept if the mass before it is below top_p.
    kept = jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]
    nucleus = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(kth, jnp.where(top_p[:, None] < 1, nucleus, -jnp.inf))
    return jnp.where(scaled < threshold, -jnp.inf, scaled)


def sample_rows(
    logits: Float[Array, "batch vocab"],
    keys: PRNGKeyArray,
    temperature: Float[Array, " batch"],
    top_k: Int[Array, " batch"],
    top_p: Float[Array, " batch"],
) -> Int[Array, " batch"]:
    """One token per row: argmax where the temperature is 0, else a draw with that row's key after filtering."""
    filtered = filter_logits(logits, temperature, top_k, top_p)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered)
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
