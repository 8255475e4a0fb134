#!/usr/bin/env bash
# `make demo`: condense real FashionMNIST on the CPU (1 image per class, factor 2, 100 inner
# steps), then evaluate the random selection, the IDC initialization and the condensed data with
# the paper's protocol (ConvNet-3, DSA, CutMix) and print a table. 6 to 16 minutes on 2 cores.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=${FASHION_DIR:-/usr/share/datasets/fashion-mnist}
OUT=${DEMO_DIR:-results/demo}
EPOCHS=${DEMO_EPOCHS:-1000}
common=(-d fashion --data_dir "$DATA" --device "${DEVICE:-auto}")
mkdir -p "$OUT"
stamp() { date +%s; }

t0=$(stamp)
"$PY" condense.py "${common[@]}" --reproduce --ipc 1 -f 2 --niter 1 --inner_loop 20 --test \
    --save_dir "$OUT/idc" --resume
t1=$(stamp)
"$PY" test.py "${common[@]}" -s random --ipc 1 --epochs "$EPOCHS" --save_dir "$OUT/random"
t2=$(stamp)
"$PY" test.py "${common[@]}" --ipc 1 -f 2 --epochs "$EPOCHS" --data_path "$OUT/idc/init.pt" \
    --save_dir "$OUT/init"
t3=$(stamp)
"$PY" test.py "${common[@]}" --ipc 1 -f 2 --epochs "$EPOCHS" --data_path "$OUT/idc/data.pt" \
    --save_dir "$OUT/condensed"
t4=$(stamp)

"$PY" - "$OUT" $((t1 - t0)) $((t2 - t1)) $((t3 - t2)) $((t4 - t3)) <<'PYEOF'
import json, sys
out, t_cond, t_rand, t_init, t_idc = sys.argv[1], *map(int, sys.argv[2:])
rows = [('random selection, ipc 1', 'random', t_rand, 0),
        ('IDC initialization, ipc 1 x f 2', 'init', t_init, 0),
        ('IDC after 100 inner steps', 'condensed', t_idc, t_cond)]
print('\nFashionMNIST, 10 stored images (1 per class), ConvNet-3 evaluation')
print(f"{'data':34s} {'best acc %':>10s} {'last acc %':>10s} {'eval s':>7s} {'condense s':>10s}")
for name, folder, t_eval, t_make in rows:
    s = json.load(open(f'{out}/{folder}/summary.json'))
    print(f"{name:34s} {s['best_mean']:10.2f} {s['last_mean']:10.2f} {t_eval:7d} "
          f"{t_make if t_make else '':>10}")
print(f'\nCondensed images: {out}/idc/img5.png (open it with any image viewer)')
PYEOF
