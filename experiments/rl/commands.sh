# The reward curves of the README (rl.png), on a 2-core CPU. GRPO: 60 supervised steps on the
# synthetic copy task, then runs/grpo_synthetic.gin (200 steps of 128 responses).
t5lite train --gin_file=runs/t5_tiny_synthetic.gin --model_dir=/tmp/rl/sft \
    --gin.train.mixture_or_task_name="'t5lite_synthetic_copy'" --gin.train.num_steps=60
t5lite train --gin_file=runs/grpo_synthetic.gin --model_dir=/tmp/rl/grpo \
    --gin.train.init_from="'/tmp/rl/sft'" --gin.train.log_every=5
# PPO: the tiny T5 of tests/test_train_loop.py (10 span-corruption steps), a reward model trained
# 12 steps on 8 of the built-in preference pairs (runs/reward_model_instructions.gin), then
# runs/ppo_instructions.gin for 40 steps at 1e-3 with 8-token responses.
t5lite train --gin_file=runs/ppo_instructions.gin --model_dir=/tmp/rl/ppo \
    --gin.train.init_from="'/tmp/rl/pretrained'" --gin.RewardModel.model_dir="'/tmp/rl/reward'" \
    --gin.train.task_feature_lengths="{'inputs': 48, 'targets': 8}" --gin.train.num_steps=40 \
    --gin.train.log_every=1 --gin.learning_rate_schedule.base_learning_rate=1e-3  # + the tiny sizes
python experiments/rl/plot_rewards.py experiments/rl/rl.png \
    "GRPO, exact match (copy)=/tmp/rl/grpo" "PPO, reward model score=/tmp/rl/ppo"
