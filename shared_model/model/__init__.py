"""LLNM-Net and what trains it, role-free: the architecture's configuration (`configuration`), the network
(`modeling`, with its `loss`), the feature head DP-SGD trains (`feature_head`) on the frozen public image backbone
(`backbone`), the report encoder (`text_encoder`, `encoder_files`), building a network from its configuration
(`architectures`), the training loop (`training`) and checkpoints (`checkpoint`). Nothing here reads a site's
files: a site's inputs are `shared_model.sitedata`'s."""
