"""The orchestration every command shares: the export road from models to a
deployable folder, and the steps run, export, check, flops, bench, optimize and build are made of.
"""
