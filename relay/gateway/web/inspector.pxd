# The request inspector, compiled from inspector.py (see docs/DESIGN.md): the proxy
# engine calls Inspector.add once per exchange of an inspected tunnel, so Inspector is
# an extension type (its fields a struct's, add a C-level method call away).

cdef class Inspector:
    cdef public object entries, _ids
