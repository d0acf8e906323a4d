"""Model definitions as hgdeploy runs them, checkpoint readers (`checkpoints`, `hf_folder`),
and how a library's own blocks are called (`blocks`).
"""
