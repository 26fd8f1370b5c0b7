# Sourced by the whole-run scripts here after record.sh: writes the random-weight OPT-1.3B with the real OPT
# tokenizer to /tmp/opt-1.3b-random and byte-compiles site-packages, as `pip install` leaves it (the lent image
# ships without .pyc; big_models.sh times the image as shipped).
python3 experiments/timings/random_opt.py opt-1.3b /tmp/opt-1.3b-random --tokenizer $M --tokenizer $D/opt-tokenizer
SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
time python3 -m compileall -q -j 0 "$SP" > /dev/null 2>&1
