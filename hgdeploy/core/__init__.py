"""What every room shares, torch-free. One user-error type and the CLI's endings (`errors`),
bundled TOML lookup (`config`), progress on stderr (`progress`), atomic files and staged folders (`files`),
memory handed back between heavy steps (`memory`), preprocessing facts (`preprocess`), every plan rule
(`plan`), recipes (`recipe`) and the graph contract an export writes and the deploy side reads (`contract`).
"""
