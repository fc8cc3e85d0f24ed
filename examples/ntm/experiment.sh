#!/bin/sh
# The NTM against an LSTM of 3.7x its parameters on copy and associative recall (Graves et
# al. 2014, sections 4.1 and 4.3), then how far each generalises past the training lengths.
# About 1 hour on 2 cores (each run 6-20 minutes); the README gives the results.
set -e
NTM="--hidden 100 --size slots=128 --size width=20 --lr 1e-3 --steps 5000 --seed 1"
LSTM="--hidden 256 --lr 3e-3 --steps 10000 --seed 1"
rnndsl train ntm --task copy $NTM --save ntm_copy.npz
rnndsl train lstm --task copy $LSTM --save lstm_copy.npz
rnndsl train ntm --task recall $NTM --save ntm_recall.npz
rnndsl train lstm --task recall $LSTM --save lstm_recall.npz
# copy: trained on 1-20 vectors; recall: on 2-6 items
rnndsl evaluate ntm_copy.npz lstm_copy.npz --length 10 --length 20 --length 30 --length 40 --length 60 --plot copy.png
rnndsl evaluate ntm_recall.npz lstm_recall.npz --length 6 --length 8 --length 10 --length 12 --plot recall.png
