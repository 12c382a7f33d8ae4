"""`jaxhet generate`: continue a prompt with a local Hugging Face checkpoint or a fresh tiny model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import jax
import typer
from rich.console import Console

from jaxhet.cli.errors import user_errors
from jaxhet.generate import SamplingConfig
from jaxhet.generate import generate as generate_tokens
from jaxhet.loading import load_model


def generate(
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "def fibonacci(n):\n",
    model: Annotated[
        Path | None,
        typer.Option(help="Local Hugging Face Llama directory; a fresh tiny model when neither this nor --run."),
    ] = None,
    run: Annotated[
        Path | None, typer.Option(help="A `jaxhet train` run directory: generate from its newest checkpoint.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 48,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1, help="Sample among the k most likely tokens.")] = 40,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = None,
    seed: Annotated[int, typer.Option(help="PRNG seed for initialisation and sampling.")] = 0,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
) -> None:
    """Generate text from a prompt."""
    console = Console()
    with user_errors():
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        init_key, sample_key = jax.random.split(jax.random.key(seed))
        loaded = load_model(run=run, hf_dir=model, dtype=dtype, key=init_key)
        llama, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source
        ids = tokenizer.encode(prompt)
        if tokenizer.bos_id is not None:
            ids = [tokenizer.bos_id, *ids]
        console.print(
            f"[dim]model: {source}; {llama.num_parameters():,} parameters; "
            f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})[/]"
        )
        start = time.perf_counter()
        (out,) = generate_tokens(llama, [ids], sampling, sample_key, stop_ids=tokenizer.stop_ids)
        elapsed = time.perf_counter() - start
    console.print(prompt, end="", style="bold", markup=False, highlight=False)
    console.print(tokenizer.decode(out), markup=False, highlight=False)
    console.print(f"[dim]{len(out)} tokens in {elapsed:.2f}s, compilation included[/]")
