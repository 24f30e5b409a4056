"""Reading and writing models: atlasmap's own directory format (:mod:`atlasmap.io.format`) and scvi-tools'
``model.pt`` (:mod:`atlasmap.io.scvi_tools`), both without executing code from the files."""
