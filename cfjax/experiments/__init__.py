"""The paper's studies on top of the library: the census bias study's parser and report."""
