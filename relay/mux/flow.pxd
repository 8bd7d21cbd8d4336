cdef class ReceiveWindow:
    cdef public long long window, credit, pending, epoch_consumed, debt, total
    cdef public object epoch_start
    cdef public double seen
    # cpdef: called by the core (typed references) on every acknowledgement.
    cpdef long long consumed(self, long long n) except? -1
    cpdef bint epoch_test(self, long long n, double now, double rtt) except -1
