"""Synthetic attention inputs with the structure real models show: local attention plus a few global keys.

Used to measure how much mass block-sparse estimators keep (tests and `bench/sparsity_quality.py`) without
model weights. Scores are q_t·k_s = local(t - s) + global(s) + noise:
- local: q and k carry a rotary code of their position with frequencies between `1/min_wavelength` and
  `1/max_wavelength` per token, so q_t·k_s = Σ cos(ω (t - s)) peaks at s = t and decays with distance;
- global: a few "sink"/"vertical" keys (always including position 0) carry a direction every query also carries;
  with the 1/sqrt(head_dim) softmax scale the local peak adds `local_strength² · sqrt(head_dim) / 2` to a
  score and a global key `global_strength²`;
- noise: isotropic Gaussian on q and k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def local_global_qkv(
    key: jax.Array,
    *,
    batch: int,
    length: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    num_global: int = 4,
    local_strength: float = 1.5,
    global_strength: float = 2.5,
    noise: float = 0.5,
    min_wavelength: float = 8.0,
    max_wavelength: float = 256.0,
) -> tuple[
    Float[Array, "batch length heads head_dim"],
    Float[Array, "batch length kv_heads head_dim"],
    Float[Array, "batch length kv_heads head_dim"],
]:
    """q, k, v (float32) whose attention is mostly local with `num_global` globally attended keys per kv head."""
    k_phase, k_glob, k_dir, k_nq, k_nk, k_v = jax.random.split(key, 6)
    half = head_dim // 2
    omega = 2 * jnp.pi / jnp.geomspace(min_wavelength, max_wavelength, half)
    phase = jax.random.uniform(k_phase, (kv_heads, half), maxval=2 * jnp.pi)
    angle = jnp.arange(length)[:, None, None] * omega + phase  # [length, kv_heads, half]
    code = jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1) * local_strength
    direction = jax.random.normal(k_dir, (kv_heads, head_dim))
    direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True) * global_strength * head_dim**0.25
    others = jax.random.choice(k_glob, jnp.arange(1, length), (kv_heads, num_global - 1), replace=False)
    is_global = jnp.zeros((kv_heads, length), bool).at[:, 0].set(True)
    is_global = is_global.at[jnp.arange(kv_heads)[:, None], others].set(True)
    k = code + is_global.T[:, :, None] * direction
    q = code + direction
    groups = heads // kv_heads
    q = jnp.repeat(q, groups, axis=1)
    q = q[None] + noise * jax.random.normal(k_nq, (batch, length, heads, head_dim))
    k = k[None] + noise * jax.random.normal(k_nk, (batch, length, kv_heads, head_dim))
    v = jax.random.normal(k_v, (batch, length, kv_heads, head_dim))
    return q, k, v
