"""Seconds per optimizer step of algos/kto.py vs TRL 1.16's KTOTrainer, at matched settings: the kto case of
benchmarks/offline_pref_speed.py (its docstring says what is matched and how it is timed).

    python benchmarks/kto_speed.py                         # 3 repeats x 40 steps each -> benchmarks/results/kto/
    python benchmarks/kto_speed.py --repeats 1 --steps 30  # a quicker look
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_pref_speed import main  # noqa: E402

if __name__ == "__main__":
    main(default_method="kto")
