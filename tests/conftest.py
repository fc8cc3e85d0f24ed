import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
    group = parser.getgroup("rnndsl")
    group.addoption("--fuzz-specs", type=int, default=12,
                    help="differential fuzzer: how many generated specs to run (default 12)")
    group.addoption("--fuzz-seconds", type=float, default=0.0,
                    help="differential fuzzer: stop after this long (default: no limit)")
    group.addoption("--fuzz-seed", type=int, default=0, help="differential fuzzer: first seed")
