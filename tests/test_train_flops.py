"""MFU: the model FLOP count, the catalog peak of JAX device kinds, and "n/a" where there is no peak."""

from types import SimpleNamespace

import jax
import pytest
from flax import nnx

from jaxhet import Llama, LlamaConfig
from jaxhet.train.flops import model_flops_utilisation, peak_flops, training_flops_per_token
from planners.catalog import for_device_kind

ONE_B = LlamaConfig(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=16, num_kv_heads=8
)


def test_flop_count_reproduces_the_published_1b_reference():
    """Issue 7's reference: 886M parameters, 94.8k tokens/s at S=2048 on one H100 is 54.8% MFU."""
    model = nnx.eval_shape(lambda: Llama(ONE_B, rngs=nnx.Rngs(0)))
    num_params = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert round(num_params / 1e6) == 886
    per_token = training_flops_per_token(ONE_B, num_params, 2048)
    h100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert model_flops_utilisation(94.8e3 * per_token, 1.0, peak_flops([h100])) == pytest.approx(0.548, abs=5e-4)


@pytest.mark.parametrize(
    "device_kind,name",
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA GeForce RTX 4090", "RTX4090"),
        ("Tesla T4", "T4"),
        ("cpu", None),
    ],
)
def test_jax_device_kinds_map_onto_the_catalog(device_kind, name):
    spec = for_device_kind(device_kind)
    assert (spec and spec.name) == name


def test_peaks_add_up_over_gpus_and_are_unknown_with_any_cpu():
    h100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    l4 = SimpleNamespace(platform="gpu", device_kind="NVIDIA L4")
    assert peak_flops([h100, l4]) == pytest.approx((989 + 121) * 1e12)
    assert peak_flops([h100, jax.devices("cpu")[0]]) is None
    assert model_flops_utilisation(1e12, 1.0, None) is None
