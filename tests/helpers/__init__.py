"""What several test modules share: tiny runs, image folders, datasets, evaluation fixtures, backbones.

Test modules import from here and from conftest's fixtures, never from another test module.
"""
