"""The command line's persistent compilation cache keeps every program, small ones too."""

import os
import subprocess
import sys

from peftdebias_jax.training import compile_cache

PROGRAM = """
import sys
import jax
from peftdebias_jax.training import compile_cache
print(compile_cache.enable(sys.argv[1]))
jax.jit(lambda x: x * 2 + 1)(1.0).block_until_ready()
"""


def run_program(directory: str, **variables: str) -> str:
    """PROGRAM in a fresh process without the test session's cache settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", **variables)
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, directory],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return done.stdout.strip()


def test_a_small_program_is_written_to_the_cache(tmp_path):
    """JAX's default keeps only programs that compile in over a second: a small model's
    steps (0.2-0.9 s each) would compile again in every seed and rerun."""
    cache = tmp_path / "xla"
    assert run_program(str(cache)) == str(cache)
    assert any(cache.iterdir()), "nothing was cached"


def test_the_users_minimum_compile_time_wins(tmp_path):
    cache = tmp_path / "xla"
    run_program(str(cache), **{compile_cache.MIN_COMPILE_TIME_VARIABLE: "60"})
    assert not any(cache.iterdir())


def test_no_directory_leaves_jax_setting_alone():
    assert run_program("") == "None"
