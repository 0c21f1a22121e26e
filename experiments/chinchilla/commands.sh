#!/bin/sh
# One launch per IsoFLOP point; each resumes from its checkpoint when rerun.
# Submit the lines to a scheduler, or run them all here with `t5lite sweep run`.
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C2.00e12_d64_L2/point.gin --model_dir=/tmp/chin2/sweep/decoder_C2.00e12_d64_L2
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C2.00e12_d64_L7/point.gin --model_dir=/tmp/chin2/sweep/decoder_C2.00e12_d64_L7
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C2.00e12_d128_L1/point.gin --model_dir=/tmp/chin2/sweep/decoder_C2.00e12_d128_L1
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C2.00e12_d128_L3/point.gin --model_dir=/tmp/chin2/sweep/decoder_C2.00e12_d128_L3
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C2.00e12_d192_L2/point.gin --model_dir=/tmp/chin2/sweep/decoder_C2.00e12_d192_L2
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C4.00e12_d64_L7/point.gin --model_dir=/tmp/chin2/sweep/decoder_C4.00e12_d64_L7
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C4.00e12_d128_L1/point.gin --model_dir=/tmp/chin2/sweep/decoder_C4.00e12_d128_L1
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C4.00e12_d128_L3/point.gin --model_dir=/tmp/chin2/sweep/decoder_C4.00e12_d128_L3
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C4.00e12_d192_L2/point.gin --model_dir=/tmp/chin2/sweep/decoder_C4.00e12_d192_L2
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C4.00e12_d192_L5/point.gin --model_dir=/tmp/chin2/sweep/decoder_C4.00e12_d192_L5
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C8.00e12_d128_L1/point.gin --model_dir=/tmp/chin2/sweep/decoder_C8.00e12_d128_L1
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C8.00e12_d128_L3/point.gin --model_dir=/tmp/chin2/sweep/decoder_C8.00e12_d128_L3
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C8.00e12_d192_L2/point.gin --model_dir=/tmp/chin2/sweep/decoder_C8.00e12_d192_L2
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C8.00e12_d192_L5/point.gin --model_dir=/tmp/chin2/sweep/decoder_C8.00e12_d192_L5
t5lite train --gin_file=/tmp/chin2/sweep/decoder_C8.00e12_d256_L4/point.gin --model_dir=/tmp/chin2/sweep/decoder_C8.00e12_d256_L4
