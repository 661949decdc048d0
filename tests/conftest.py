"""Test setup: 8 simulated CPU devices (set before jax is imported), persistent compile cache."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir", os.environ.get("JAX_CACHE_DIR", "/tmp/metastone-jax-cache")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

# Every program XLA:CPU compiles maps its code into memory, a few hundred mappings each (the
# paged engine compiles a decode segment per slot count as its tail shrinks: ~5,000 mappings a
# run). They stay while JAX's caches hold the executable, and a process may hold 65,530
# (vm.max_map_count): past that XLA's next mmap fails and the process dies (SIGSEGV or SIGABRT
# inside a compile, 60% into a full run). Above MAX_MAPS the caches are dropped between tests.
MAX_MAPS = 30_000


SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


@pytest.fixture(scope="session")
def shared_dir():
    path = os.path.abspath(SHARED)
    if not os.path.isdir(path):
        pytest.skip(f"../shared not found at {path}")
    return path


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to watch
        return 0


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
    yield
    if _memory_maps() > MAX_MAPS:
        import gc

        jax.clear_caches()
        gc.collect()


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs://BUCKET/x lands in tmp_path/BUCKET/x, for etils.epath and orbax (tests/fake_gcs.py);
    yields tmp_path."""
    from fake_gcs import fake_gcs_at

    with fake_gcs_at(tmp_path, monkeypatch) as root:
        yield root
