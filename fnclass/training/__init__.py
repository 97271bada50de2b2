"""The training program: ``train(config, workdir)``, its loop, the step and what plugs into them."""
