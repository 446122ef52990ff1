/* The validated all-reduce, and the other small collectives, in one C call
   (mpipar.comm.agreement.fast).

   The same protocol as mpipar.comm.agreement.inline: this rank's head (and, for a
   small tensor, its data) go into its row of the group's table, one in-place
   MPI_Allgather of the table, every row's agreed head compared with this call's; then
   a small tensor's rows are reduced in rank order into it (inline's _small_all_reduce),
   a larger one goes to MPI_Allreduce in place (collectives._all_reduce's "mpi" path). In Python that is a dozen frames and torch calls around
   one Allgather (a 4 KiB all-reduce took 4x raw MPI's time); here the Python caller
   makes one call, and the call records itself in the flight ring through the ring's C
   API (mpipar.flight.ring), so the record costs no Python either.

   MPI_Allgather is called through a pointer that mpipar.comm.agreement.fast looked up
   in the MPI library mpi4py loaded, with mpi4py's handles: no MPI headers, and the
   same library and communicator as mpi4py's. Handles are passed as intptr_t, the
   width of a pointer (an int handle is read from the low half of its register on the
   ABIs mpipar builds for: x86-64, aarch64).

   Where a group's ranks outnumber the node's cores, the table is exchanged through shared
   memory instead (mpipar.comm.agreement.shm_table: this rank's row into its slot, its
   epoch published, every peer's epoch awaited, their slots read), with the wait in C under
   the caller's back-off (mpipar.comm.wait.POLITE, passed with each call): the Python
   around the exchange was most of a crowded rank's time, which its peers wait for. There
   the small collectives take the whole call, a larger one the exchange and then MPI's
   blocking collective (every rank is present once the exchange returns: wait.all_present),
   and every other agreement the exchange alone (ctx.exchange).

   ctx.run does for a small broadcast, all_gather, reduce_scatter or all_to_all whose data
   rides in the table (mpipar.comm.agreement.fast_ops) what the call does for the
   all-reduce: the head and payload into this rank's row, the exchange, the heads checked,
   then blocks of the rows copied (in rank order along the gathered dim) or reduced in
   rank order (the all-reduce's kernels) into an output the caller allocated, as a key
   made once per signature and group describes (inline_ops' results, byte for byte). For
   a larger one (KIND_MPI) the key names MPI's collective instead: after the exchange and
   the heads, MPI_Bcast, MPI_Allgather, MPI_Reduce_scatter_block or MPI_Alltoall on the
   caller's memory, with the datatype and count collectives.py's Python path passes (so a
   rank on that path meets the C ranks). Each torch call on that path costs microseconds;
   a 64 KiB all-gather spent 3x MPI's own time in them.

   Where the table is shared, a key of KIND_SLOT_COPY or KIND_SLOT_REDUCE does what KIND_COPY and
   KIND_REDUCE do with the payloads in the table's payload slots (shm_table.PAYLOAD_BYTES each):
   this rank's data into its slot of the exchange's parity before it, the peers' read after it,
   the GIL released for the copies. A larger all-reduce there (KIND_SLOT_SPLIT) reduces in two
   steps, each rank its own chunk, with a second exchange between them (split_reduce). From
   STREAM_FROM bytes the slots' copies bypass the cache (`copy`: compiled.c's stream_copy). A
   larger all_to_all there (KIND_CMA_COPY) puts only its pid and input address in its slot, and
   every rank reads its blocks out of the peers' inputs with process_vm_readv (cma_blocks).

   The reduction is exact and the same bits on every rank: out = row0 op row1, then
   out = out op row_k for k = 2.. (torch.add / maximum / minimum in the same order in
   inline.py). Floats only sum (torch.maximum's NaN rules stay in Python); integers
   wrap (unsigned arithmetic, as torch). Built with -ffp-contract=off: no fused
   multiply-add, and no reassociation (no -ffast-math). Built with -O3: GCC's -O2 vectorizes
   a loop only where its count is a known multiple of the vector width, so the reduction ran
   one element at a time. Vector adds round each element as the scalar ones do.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <limits.h>
#include <stddef.h>
#include <string.h>
#include <sched.h>
#include <time.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <errno.h>
#include <unistd.h>

typedef int (*allgather_fn)(const void *, int, intptr_t, void *, int, intptr_t, intptr_t);
typedef int (*allreduce_fn)(const void *, void *, int, intptr_t, intptr_t, intptr_t);
typedef int (*bcast_fn)(void *, int, intptr_t, int, intptr_t);
typedef void (*copy_fn)(char *, const char *, size_t);
/* MPI_Alltoall has MPI_Allgather's signature, MPI_Reduce_scatter_block MPI_Allreduce's */

typedef struct {
    Py_ssize_t (*begin)(PyObject *ch, PyObject *name, PyObject *algo, PyObject *info);
    int (*end)(Py_ssize_t i);
} RingApi; /* mpipar/flight/ring.c's api capsule */

enum { HEAD_WORDS = 6, MINE_WORDS = 3, AGREED_BYTES = 16 };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    allgather_fn allgather;
    allreduce_fn allreduce;
    bcast_fn bcast;             /* NULL: run() leaves KIND_MPI calls to Python */
    allgather_fn alltoall;
    allreduce_fn reduce_scatter_block;
    intptr_t comm, byte_type, in_place;
    intptr_t types[7], ops[3]; /* MPI datatypes of FAST_DTYPES' codes 0-6, MPI_SUM/MAX/MIN */
    char *table;
    Py_ssize_t row_bytes, n, rank;
    RingApi *ring;   /* NULL: not recorded */
    PyObject *name;  /* "all_reduce" */
    int record;      /* 0: the benchmark's "off" (experiments/flight_overhead.py) */
    PyObject *keep;  /* the table's owner (and the shared table's), kept alive */
    /* the shared-memory exchange (shm_table.ShmTable), or shm == 0: MPI_Allgather */
    int shm;
    char **slots;     /* slots[2 * r + p]: rank r's slot p */
    int64_t **epochs; /* rank r's epoch word */
    int64_t *count;   /* the exchanges made so far (ShmTable.count: Python's exchanges too) */
    char **payloads;  /* payloads[2 * r + p]: rank r's payload slot p (ShmTable's, payload_bytes each), or NULL */
    int64_t payload_bytes;
    const char **rows; /* n row addresses, filled per call (the GIL serialises a context's calls) */
    copy_fn stream;    /* compiled.c's stream_copy (mpipar.comm.symmetric.compiled), or NULL: memcpy */
    int cma;           /* 1: KIND_CMA_COPY keys run (every rank of the group read a peer's memory: cma.py) */
} Context;

/* mpipar.comm.wait.Backoff, as Backoff.packed gives it */
typedef struct {
    double spin_s, yield_s, first_sleep, max_sleep, share, longest_sleep, timer_slack_ns;
} Policy;

/* Backoff.packed into *p: 0, or -1 with an exception. */
static int read_policy(PyObject *o, Policy *p)
{
    Py_buffer pb;
    if (PyObject_GetBuffer(o, &pb, PyBUF_SIMPLE) < 0)
        return -1;
    int ok = pb.len == (Py_ssize_t)sizeof *p;
    if (ok)
        memcpy(p, pb.buf, sizeof *p);
    PyBuffer_Release(&pb);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "fast all_reduce: a policy is 7 doubles (Backoff.packed)");
        return -1;
    }
    return 0;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int reached(const Context *s, int64_t k)
{
    for (Py_ssize_t r = 0; r < s->n; r++)
        if (r != s->rank && __atomic_load_n(s->epochs[r], __ATOMIC_ACQUIRE) < k)
            return 0;
    return 1;
}

/* Backoff.wait of mpipar.comm.wait, until every peer's epoch is >= k (the GIL released). */
static void await_epochs(const Context *s, int64_t k, const Policy *p)
{
    static __thread double slack_set = -1.0;
    if (reached(s, k))
        return;
    double start = now(), t;
    while (now() - start < p->spin_s)
        if (reached(s, k))
            return;
    while (now() - start < p->yield_s) {
        sched_yield();
        if (reached(s, k))
            return;
    }
    if (p->timer_slack_ns > 0 && slack_set != p->timer_slack_ns) {
        prctl(PR_SET_TIMERSLACK, (unsigned long)p->timer_slack_ns, 0, 0, 0);
        slack_set = p->timer_slack_ns;
    }
    double sleep = p->first_sleep, cap = p->max_sleep;
    while (!reached(s, k)) {
        struct timespec ts = {(time_t)sleep, (long)((sleep - (double)(time_t)sleep) * 1e9)};
        nanosleep(&ts, NULL);
        if (p->share > 0) {
            t = p->share * (now() - start);
            cap = t < p->longest_sleep ? t : p->longest_sleep;
            if (cap < p->max_sleep)
                cap = p->max_sleep;
        }
        sleep = sleep * 2 < cap ? sleep * 2 : cap;
    }
}

/* The rows' payloads in the table, as self->rows. */
static const char *const *table_rows(Context *s)
{
    for (Py_ssize_t r = 0; r < s->n; r++)
        s->rows[r] = s->table + r * s->row_bytes + HEAD_WORDS * 8;
    return s->rows;
}

/* n rows `stride` bytes apart from `base` (MPI's pieces in a scratch buffer), as self->rows. */
static const char *const *strided_rows(Context *s, const char *base, Py_ssize_t stride)
{
    for (Py_ssize_t r = 0; r < s->n; r++)
        s->rows[r] = base + r * stride;
    return s->rows;
}

/* The payload slots of parity `par`, as self->rows. */
static const char *const *payload_rows(Context *s, int par)
{
    for (Py_ssize_t r = 0; r < s->n; r++)
        s->rows[r] = s->payloads[2 * r + par];
    return s->rows;
}

/* ShmTable.gather in C: this rank's row into its slot of this exchange's parity, its epoch
   published (after the row: release), every peer's awaited (acquire), their rows read. */
static void shm_exchange(Context *s, const Policy *p)
{
    int64_t k = ++*s->count;
    int par = (int)(k & 1);
    char *mine = s->table + s->rank * s->row_bytes;
    memcpy(s->slots[2 * s->rank + par], mine, (size_t)s->row_bytes);
    __atomic_store_n(s->epochs[s->rank], k, __ATOMIC_RELEASE);
    await_epochs(s, k, p);
    for (Py_ssize_t r = 0; r < s->n; r++)
        if (r != s->rank)
            memcpy(s->table + r * s->row_bytes, s->slots[2 * r + par], (size_t)s->row_bytes);
}

/* A second exchange with no row: this rank's epoch published, every peer's awaited. Each rank
   wrote what the peers read after it (a split all-reduce's reduced chunk) before publishing;
   the rows' slots of its parity keep the rows of the exchange two before, which nobody reads
   again. */
static void shm_sync(Context *s, const Policy *p)
{
    int64_t k = ++*s->count;
    __atomic_store_n(s->epochs[s->rank], k, __ATOMIC_RELEASE);
    await_epochs(s, k, p);
}

/* The call's key (inline._Call.fast): its head words, its byte count, its kernel, its mode. */
typedef struct {
    int64_t head[MINE_WORDS];
    int64_t nbytes;
    int64_t kernel; /* dtype * 3 + op */
    int64_t mpi;    /* 0: the data rides in the table; 1: MPI_Allreduce after the agreement */
} Key;

#define REDUCE(T, OP)                                                               \
    do {                                                                            \
        T *o = (T *)out;                                                            \
        const T *a = (const T *)(rows[0] + off), *b = (const T *)(rows[1] + off);   \
        for (Py_ssize_t i = 0; i < count; i++)                                      \
            o[i] = OP(a[i], b[i]);                                                  \
        for (Py_ssize_t k = 2; k < n; k++) {                                        \
            const T *c = (const T *)(rows[k] + off);                                \
            for (Py_ssize_t i = 0; i < count; i++)                                  \
                o[i] = OP(o[i], c[i]);                                              \
        }                                                                           \
    } while (0)

static const int SIZE[7] = {4, 8, 8, 4, 2, 1, 1}; /* bytes of FAST_DTYPES' codes 0-6 */

#define ADD(x, y) ((x) + (y))
#define MAX(x, y) ((x) > (y) ? (x) : (y))
#define MIN(x, y) ((x) < (y) ? (x) : (y))

/* Whether reduce() has `kernel`. */
static int kernel_ok(int64_t kernel)
{
    return kernel >= 0 && kernel / 3 <= 6 && (kernel / 3 >= 2 || kernel % 3 == 0);
}

/* kernel = dtype * 3 + op; dtype: f32, f64, i64, i32, i16, i8, u8 (inline.FAST_DTYPES);
   op: sum, max, min. Integers are summed unsigned (wrapping, as torch). Row k's operand starts at
   rows[k] + off. 0, or -1. */
static int reduce(int64_t kernel, char *out, const char *const *rows, int64_t off, Py_ssize_t n, int64_t nbytes)
{
    int dtype = (int)(kernel / 3);
    if (!kernel_ok(kernel))
        return -1;
    Py_ssize_t count = (Py_ssize_t)(nbytes / SIZE[dtype]);
    switch (kernel) {
    case 0: REDUCE(float, ADD); break;
    case 3: REDUCE(double, ADD); break;
    case 6: REDUCE(uint64_t, ADD); break;
    case 7: REDUCE(int64_t, MAX); break;
    case 8: REDUCE(int64_t, MIN); break;
    case 9: REDUCE(uint32_t, ADD); break;
    case 10: REDUCE(int32_t, MAX); break;
    case 11: REDUCE(int32_t, MIN); break;
    case 12: REDUCE(uint16_t, ADD); break;
    case 13: REDUCE(int16_t, MAX); break;
    case 14: REDUCE(int16_t, MIN); break;
    case 15: REDUCE(uint8_t, ADD); break;
    case 16: REDUCE(int8_t, MAX); break;
    case 17: REDUCE(int8_t, MIN); break;
    case 18: REDUCE(uint8_t, ADD); break;
    case 19: REDUCE(uint8_t, MAX); break;
    case 20: REDUCE(uint8_t, MIN); break;
    default: return -1;
    }
    return 0;
}

/* ctx(group, info, algorithm, data_ptr, key, policy): True when `data` is reduced in place;
   False when the heads disagree (the caller raises, collectively: every rank saw the
   same table). The call is recorded as all_reduce on `group`, described by `info`. */
static PyObject *call(Context *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 + self->shm) {
        PyErr_SetString(PyExc_TypeError, self->shm ? "fast all_reduce: (group, info, algorithm, data_ptr, key, policy)"
                                                   : "fast all_reduce: (group, info, algorithm, data_ptr, key)");
        return NULL;
    }
    Policy policy = {0};
    if (self->shm && read_policy(args[5], &policy) < 0)
        return NULL;
    char *data = (char *)PyLong_AsVoidPtr(args[3]);
    if (data == NULL && PyErr_Occurred())
        return NULL;
    Py_buffer kb;
    if (PyObject_GetBuffer(args[4], &kb, PyBUF_SIMPLE) < 0)
        return NULL;
    if (kb.len != (Py_ssize_t)sizeof(Key)) {
        PyBuffer_Release(&kb);
        PyErr_SetString(PyExc_ValueError, "fast all_reduce: a key is 6 int64");
        return NULL;
    }
    Key key;
    memcpy(&key, kb.buf, sizeof key);
    PyBuffer_Release(&kb);
    int dtype = (int)(key.kernel / 3), op = (int)(key.kernel % 3);
    if (key.kernel < 0 || dtype > 6 || key.nbytes < 0 ||
        (key.mpi ? key.nbytes / SIZE[dtype] > INT_MAX : key.nbytes > self->row_bytes - HEAD_WORDS * 8)) {
        PyErr_SetString(PyExc_ValueError, "fast all_reduce: a bad key");
        return NULL;
    }
    Py_ssize_t slot = -1;
    if (self->record && self->ring != NULL) {
        slot = self->ring->begin(args[0], self->name, args[2], args[1]);
        if (slot == -2)
            return NULL;
    }
    char *mine = self->table + self->rank * self->row_bytes;
    memcpy(mine, key.head, sizeof key.head);
    if (key.mpi) /* no symmetric descriptor (inline.exchange_args: -1 without a pool) */
        memset(mine + MINE_WORDS * 8, 0xff, (HEAD_WORDS - MINE_WORDS) * 8);
    else if (key.nbytes)
        memcpy(mine + HEAD_WORDS * 8, data, (size_t)key.nbytes);
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS /* the watchdog reads the ring meanwhile */
    if (self->shm)
        shm_exchange(self, &policy);
    else
        rc = self->allgather((const void *)self->in_place, 0, self->byte_type, self->table, (int)self->row_bytes,
                             self->byte_type, self->comm);
    Py_END_ALLOW_THREADS
    int agreed = 1;
    for (Py_ssize_t r = 0; rc == 0 && r < self->n; r++)
        if (memcmp(self->table + r * self->row_bytes, key.head, AGREED_BYTES) != 0)
            agreed = 0;
    int bad = 0;
    if (rc == 0 && agreed && key.mpi) {
        Py_BEGIN_ALLOW_THREADS
        rc = self->allreduce((const void *)self->in_place, data, (int)(key.nbytes / SIZE[dtype]), self->types[dtype],
                             self->ops[op], self->comm);
        Py_END_ALLOW_THREADS
    } else if (rc == 0 && agreed) {
        bad = reduce(key.kernel, data, table_rows(self), 0, self->n, key.nbytes) < 0;
    }
    if (slot >= 0 && self->ring->end(slot) < 0)
        return NULL;
    if (rc != 0)
        return PyErr_Format(PyExc_RuntimeError, "MPI error %d in the all_reduce's MPI_Allgather or MPI_Allreduce", rc);
    if (bad)
        return PyErr_Format(PyExc_ValueError, "fast all_reduce: no kernel %lld", (long long)key.kernel);
    return PyBool_FromLong(agreed);
}

static PyObject *fast_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames)) {
        PyErr_SetString(PyExc_TypeError, "fast all_reduce: positional arguments only");
        return NULL;
    }
    return call((Context *)self, args, PyVectorcall_NARGS(nargsf));
}

static void dealloc(Context *self)
{
    PyMem_Free(self->slots);
    PyMem_Free(self->epochs);
    PyMem_Free(self->payloads);
    PyMem_Free((void *)self->rows);
    Py_XDECREF(self->name);
    Py_XDECREF(self->keep);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ctx.exchange(policy): the shared table's exchange alone (ShmTable.gather of the row this rank
   wrote), for the agreements that finish in Python (mpipar.comm.agreement.inline). */
static PyObject *exchange(Context *self, PyObject *arg)
{
    if (!self->shm) {
        PyErr_SetString(PyExc_TypeError, "fast exchange: the table is not shared");
        return NULL;
    }
    Policy policy;
    if (read_policy(arg, &policy) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    shm_exchange(self, &policy);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The key of a small broadcast, all_gather, reduce_scatter or all_to_all (mpipar.comm.agreement.
   fast_ops: built once per signature and group). After the exchange, rows k0 .. k0 + nk - 1 are
   read as blocks: LOOPS nested loops (size, source and destination strides in bytes; 1 where
   unused) over runs of `run` contiguous bytes, from `src0` in each row, block j at j * dst_step in
   `out` (copy), or every row's block reduced in rank order into `out` (reduce). */
enum { LOOPS = 6 };
typedef struct {
    int64_t head[MINE_WORDS];
    int64_t kind;          /* KIND_COPY, KIND_REDUCE */
    int64_t nbytes;        /* bytes of `in` into this rank's row (0: none) */
    int64_t kernel;        /* reduce: dtype * 3 + op (as Key.kernel) */
    int64_t free;          /* >= 0: every row's free size (all_gather) must be this, else the caller finishes */
    int64_t no_descriptor; /* 1: this rank's descriptor words -1 (inline.exchange_args without a pool entry) */
    int64_t k0, nk, src0, dst_step, run, out_bytes;
    int64_t size[LOOPS], src[LOOPS], dst[LOOPS];
    /* KIND_MPI: after the agreement, MPI's collective `call` moves `count` elements of
       datatype types[dtype] (reduce_scatter: per rank, under ops[op]; broadcast: from root k0)
       from in_ptr into out_ptr (all_gather: MPI_IN_PLACE when in_ptr is this rank's block);
       with nk > 0, into scratch_ptr instead, whose pieces (count elements each, rank by rank)
       the loops then copy into out_ptr as they copy the table's rows */
    int64_t call, count, dtype, op;
    /* pre_run > 0: first the input, walked by these loops (runs of pre_run bytes), into the
       scratch's send area (after the pieces' area): MPI then sends it from there */
    int64_t pre_run, pre_size[LOOPS], pre_src[LOOPS], pre_dst[LOOPS];
} OpKey;

/* KIND_SLOT_COPY and KIND_SLOT_REDUCE are KIND_COPY and KIND_REDUCE with the payloads in the
   shared table's payload slots (crowded groups: up to payload_bytes) instead of its rows.
   KIND_SLOT_SPLIT is a whole-tensor KIND_SLOT_REDUCE (one run of nbytes, the all-reduce) made in
   two steps, as a reduce-scatter and then an all-gather: after the exchange each rank reduces
   its chunk of the rows only (split_reduce), into its payload slot of the other parity, and a
   second exchange (shm_sync) lets every rank copy the others' chunks. Each rank reads a quarter
   of the rows at 4 ranks, not all of them, for one more synchronisation.
   KIND_CMA_COPY is a KIND_SLOT_COPY whose rows are the peers' inputs themselves, read with
   process_vm_readv (cross-memory attach, one copy where the slots make two): each rank writes
   only a descriptor (pid, input address, bytes) into its payload slot; after the exchange it
   reads its blocks straight out of each peer's input (cma_blocks), and a second exchange
   (shm_sync) keeps every input in place until all peers have read it. */
enum { KIND_COPY = 1, KIND_REDUCE = 2, KIND_MPI = 3, KIND_SLOT_COPY = 4, KIND_SLOT_REDUCE = 5, KIND_SLOT_SPLIT = 6,
       KIND_CMA_COPY = 7 };
enum { CALL_ALLGATHER = 1, CALL_REDUCE_SCATTER = 2, CALL_BCAST = 3, CALL_ALLTOALL = 4 };
enum { RUN_DISAGREED = 0, RUN_DONE = 1, RUN_FINISH = 2 }; /* run()'s status */

/* KIND_MPI: the bytes this rank sends (the input), and the bytes of the pieces MPI writes into the
   scratch (what it receives), for n ranks. */
static int64_t send_bytes(const OpKey *k, Py_ssize_t n)
{
    return k->count * SIZE[k->dtype] * (k->call == CALL_ALLGATHER ? 1 : (int64_t)n);
}

static int64_t pieces_bytes(const OpKey *k, Py_ssize_t n)
{
    return k->count * SIZE[k->dtype] * (k->call == CALL_REDUCE_SCATTER ? 1 : (int64_t)n);
}

/* Whether a walk (loops of sizes, byte strides src and dst, runs of `run` bytes) reads and writes
   within `limit` bytes on both sides. */
static int walk_in_bounds(const int64_t *size, const int64_t *src, const int64_t *dst, int64_t run, int64_t limit)
{
    int64_t s_end = run, d_end = run;
    for (int i = 0; i < LOOPS; i++) {
        if (size[i] < 1 || size[i] > limit || src[i] < 0 || dst[i] < 0)
            return 0;
        s_end += (size[i] - 1) * src[i];
        d_end += (size[i] - 1) * dst[i];
    }
    return s_end <= limit && d_end <= limit;
}

/* The walk's runs from `from` into `to` (its bounds checked by walk_in_bounds). */
static void walk_copy(const int64_t *size, const int64_t *src, const int64_t *dst, int64_t run, const char *from,
                      char *to)
{
    int64_t idx[LOOPS] = {0}, total = 1;
    for (int i = 0; i < LOOPS; i++)
        total *= size[i];
    for (int64_t it = 0; it < total; it++) {
        int64_t so = 0, d = 0;
        for (int i = 0; i < LOOPS; i++) {
            so += idx[i] * src[i];
            d += idx[i] * dst[i];
        }
        memcpy(to + d, from + so, (size_t)run);
        for (int i = LOOPS - 1; i >= 0 && ++idx[i] == size[i]; i--)
            idx[i] = 0;
    }
}

/* Whether every access `key` describes stays inside the row payloads and `out` (KIND_MPI: whether its
   MPI call is one this context has, with a count MPI takes; the buffers are the caller's). */
static int key_in_bounds(const OpKey *k, Py_ssize_t n, Py_ssize_t payload)
{
    if (k->kind == KIND_MPI) {
        if (!(k->call >= CALL_ALLGATHER && k->call <= CALL_ALLTOALL && k->count >= 0 && k->count <= INT_MAX &&
              k->dtype >= 0 && k->dtype <= 6 && k->op >= 0 && k->op <= 2 && k->nbytes == 0 &&
              (k->call != CALL_BCAST || (k->k0 >= 0 && k->k0 < n)) &&
              (k->call != CALL_ALLTOALL || (int64_t)n * k->count <= INT_MAX)))
            return 0;
        if (k->nk == 0)
            return k->pre_run == 0; /* MPI reads `in` and writes `out` itself */
        if (k->call == CALL_BCAST)
            return 0;
        if (k->pre_run < 0 || (k->pre_run > 0 && !walk_in_bounds(k->pre_size, k->pre_src, k->pre_dst, k->pre_run,
                                                                   send_bytes(k, n))))
            return 0;
        payload = (Py_ssize_t)(k->count * SIZE[k->dtype]); /* then the blocks are read from the scratch's pieces */
    }
    int64_t src = k->src0 + k->run, dst = k->run, total = 1;
    if (k->k0 < 0 || k->nk < 0 || k->k0 + k->nk > n || k->run < 0 || k->src0 < 0 || k->dst_step < 0 ||
        k->nbytes < 0 || k->nbytes > payload || k->out_bytes < 0)
        return 0;
    for (int i = 0; i < LOOPS; i++) {
        if (k->size[i] < 0 || k->size[i] > payload + 1 || k->src[i] < 0 || k->dst[i] < 0)
            return 0;
        total *= k->size[i];
        if (k->size[i] > 0) {
            src += (k->size[i] - 1) * k->src[i];
            dst += (k->size[i] - 1) * k->dst[i];
        }
    }
    if (total == 0 || k->run == 0 || k->nk == 0)
        return 1; /* nothing is read or written */
    if (k->kind == KIND_REDUCE)
        return k->k0 == 0 && k->nk == n && n >= 2 && src <= payload && dst <= k->out_bytes;
    return src <= payload && (k->nk - 1) * k->dst_step + dst <= k->out_bytes;
}

/* From this size the copies into the payload slots, and every run `blocks` copies into a result
   (out of the slots or MPI's scratch), use non-temporal stores: the ranks' tensors and slots
   outgrow the cache (16 MiB of slots at 4 ranks and 4 MiB, against an 8 MiB L3 here), and a
   store that misses it reads the line first (at 4 ranks on 2 cores, time / raw mpi4py's:
   all-reduce 4 MiB 0.86-1.07 -> 0.72-0.76, broadcast 8 MiB 0.82-0.90 -> 0.46-0.63;
   results/TUNING.md) */
#define STREAM_FROM ((int64_t)2 << 20)

/* memcpy, or from STREAM_FROM bytes (`big`: the call's size) compiled.c's stream_copy where the
   context has it: non-temporal stores, fenced, so visible before the caller's next release store */
static void copy(const Context *s, int big, char *dst, const char *src, size_t n)
{
    if (big && s->stream != NULL)
        s->stream(dst, src, n);
    else
        memcpy(dst, src, n);
}

/* The blocks of `key` out of the n rows at `rows` (the table's payloads, the payload slots, or
   the pieces MPI wrote into a scratch buffer) into `out`: 0, or -1 (no such kernel). */
static int blocks(const Context *s, const OpKey *k, const char *const *rows, Py_ssize_t n, char *out)
{
    int64_t idx[LOOPS] = {0}, total = 1;
    for (int i = 0; i < LOOPS; i++)
        total *= k->size[i];
    if (total == 0 || k->run == 0 || k->nk == 0)
        return 0;
    for (int64_t it = 0; it < total; it++) {
        int64_t so = 0, d = 0;
        for (int i = 0; i < LOOPS; i++) {
            so += idx[i] * k->src[i];
            d += idx[i] * k->dst[i];
        }
        if (k->kind == KIND_REDUCE) {
            if (reduce(k->kernel, out + d, rows, k->src0 + so, n, k->run) < 0)
                return -1;
        } else {
            for (int64_t j = 0; j < k->nk; j++)
                copy(s, k->run >= STREAM_FROM, out + j * k->dst_step + d, rows[k->k0 + j] + k->src0 + so,
                     (size_t)k->run);
        }
        for (int i = LOOPS - 1; i >= 0 && ++idx[i] == k->size[i]; i--)
            idx[i] = 0;
    }
    return 0;
}

/* Whether a KIND_SLOT_SPLIT key is the whole tensor in one run, with a kernel. */
static int split_in_bounds(const OpKey *k)
{
    for (int i = 0; i < LOOPS; i++)
        if (k->size[i] != 1)
            return 0;
    return kernel_ok(k->kernel) && k->src0 == 0 && k->run == k->nbytes && k->out_bytes == k->nbytes &&
           k->nbytes % SIZE[k->kernel / 3] == 0;
}

/* Rank r's chunk of a split all-reduce of nbytes (elements of `item` bytes): [*lo, *hi), whole
   cache lines but for the last. */
static void chunk(int64_t nbytes, int64_t item, Py_ssize_t n, Py_ssize_t r, int64_t *lo, int64_t *hi)
{
    int64_t line = 64 / item, count = nbytes / item, per = (count + n - 1) / n;
    per = (per + line - 1) / line * line;
    *lo = r * per < count ? r * per : count;
    *hi = *lo + per < count ? *lo + per : count;
    *lo *= item;
    *hi *= item;
}

/* KIND_SLOT_SPLIT after the exchange of parity `par` (the GIL released): this rank's chunk of
   the rows reduced in rank order into its payload slot of the other parity (the peers read
   that parity's slots last in the exchange before this one, which they have left), the second
   exchange, then every chunk out of its owner's slot into `out`. */
static void split_reduce(Context *s, const OpKey *k, int par, char *out, const Policy *p)
{
    int64_t item = SIZE[k->kernel / 3], lo, hi;
    chunk(k->nbytes, item, s->n, s->rank, &lo, &hi);
    if (hi > lo)
        reduce(k->kernel, s->payloads[2 * s->rank + (par ^ 1)] + lo, payload_rows(s, par), lo, s->n, hi - lo);
    shm_sync(s, p);
    for (Py_ssize_t r = 0; r < s->n; r++) {
        chunk(k->nbytes, item, s->n, r, &lo, &hi);
        if (hi > lo)
            copy(s, k->nbytes >= STREAM_FROM, out + lo, s->payloads[2 * r + (par ^ 1)] + lo, (size_t)(hi - lo));
    }
}

/* The iovecs one process_vm_readv takes at most here (the kernel's limit is IOV_MAX, 1024). */
enum { CMA_IOVS = 64 };

/* One process_vm_readv of `cnt` runs from process `pid`: 0, or an errno (a short read is EIO). */
static int cma_read(pid_t pid, struct iovec *local, struct iovec *remote, int cnt)
{
    size_t want = 0;
    for (int i = 0; i < cnt; i++)
        want += local[i].iov_len;
    ssize_t got = process_vm_readv(pid, local, (unsigned long)cnt, remote, (unsigned long)cnt, 0);
    if (got < 0)
        return errno ? errno : EIO;
    return (size_t)got == want ? 0 : EIO;
}

/* KIND_CMA_COPY after the exchange of parity `par` (the GIL released): the blocks of `key` read
   out of every row's input, as `blocks` reads them out of the slots: a peer's with
   process_vm_readv at the address its descriptor gives, this rank's own from `in`. Rows are
   read starting after this rank's, so that the ranks do not all read rank 0 first. 0, or the
   errno of the first read that failed (then `out` is incomplete). */
static int cma_blocks(const Context *s, const OpKey *k, int par, const char *in, char *out)
{
    int64_t total = 1;
    for (int i = 0; i < LOOPS; i++)
        total *= k->size[i];
    if (total == 0 || k->run == 0 || k->nk == 0)
        return 0;
    struct iovec local[CMA_IOVS], remote[CMA_IOVS];
    for (int64_t jj = 0; jj < k->nk; jj++) {
        int64_t j = (jj + s->rank + 1) % k->nk, r = k->k0 + j;
        const int64_t *desc = (const int64_t *)s->payloads[2 * r + par];
        if (desc[2] != k->nbytes)
            return EINVAL; /* (the heads agreed on the shape: a peer's slot was not this call's) */
        const char *base = r == s->rank ? in : (const char *)(intptr_t)desc[1];
        int64_t idx[LOOPS] = {0};
        int cnt = 0, rc = 0;
        for (int64_t it = 0; it < total; it++) {
            int64_t so = 0, d = 0;
            for (int i = 0; i < LOOPS; i++) {
                so += idx[i] * k->src[i];
                d += idx[i] * k->dst[i];
            }
            char *to = out + j * k->dst_step + d;
            if (r == s->rank) {
                copy(s, k->run >= STREAM_FROM, to, base + k->src0 + so, (size_t)k->run);
            } else {
                local[cnt] = (struct iovec){to, (size_t)k->run};
                remote[cnt] = (struct iovec){(void *)(base + k->src0 + so), (size_t)k->run};
                if (++cnt == CMA_IOVS) {
                    if ((rc = cma_read((pid_t)desc[0], local, remote, cnt)) != 0)
                        return rc;
                    cnt = 0;
                }
            }
            for (int i = LOOPS - 1; i >= 0 && ++idx[i] == k->size[i]; i--)
                idx[i] = 0;
        }
        if (cnt && (rc = cma_read((pid_t)desc[0], local, remote, cnt)) != 0)
            return rc;
    }
    return 0;
}

/* KIND_CMA_COPY's end (the GIL released): this rank's errno (0: it read everything) into the
   first word of its payload slot of the other parity (as split_reduce's chunk), the second
   exchange, then the first peer's nonzero errno, as -(rank + 1) * 4096 - errno, or 0: every
   rank then knows whether any read failed, and raises alike. */
static int64_t cma_finish(Context *s, int par, int err, const Policy *p)
{
    *(volatile int64_t *)s->payloads[2 * s->rank + (par ^ 1)] = err;
    shm_sync(s, p);
    for (Py_ssize_t r = 0; r < s->n; r++) {
        int64_t e = *(volatile const int64_t *)s->payloads[2 * r + (par ^ 1)];
        if (e != 0)
            return -(int64_t)(r + 1) * 4096 - e;
    }
    return 0;
}

/* KIND_MPI's collective (the GIL released by the caller): MPI's return code. */
static int mpi_call(const Context *s, const OpKey *k, char *in, char *out)
{
    intptr_t type = s->types[k->dtype];
    int count = (int)k->count;
    switch (k->call) {
    case CALL_ALLGATHER: {
        const void *send = in == out + (Py_ssize_t)s->rank * k->count * SIZE[k->dtype] ? (const void *)s->in_place : in;
        return s->allgather(send, count, type, out, count, type, s->comm);
    }
    case CALL_REDUCE_SCATTER:
        return s->reduce_scatter_block(in, out, count, type, s->ops[k->op], s->comm);
    case CALL_BCAST:
        return s->bcast(out, count, type, (int)k->k0, s->comm);
    default:
        return s->alltoall(in, count, type, out, count, type, s->comm);
    }
}

/* ctx.run(group, info, algorithm, name, in_ptr, out_ptr, key, policy): a small collective named
   `name` whose data rides in the table, finished here (mpipar.comm.agreement.fast_ops). Returns
   1 (RUN_DONE) when `out` holds the result and the call is recorded; else (slot + 1) * 4 + status
   with the record still open at `slot` (-1: none) for the caller to finish and close: status
   RUN_DISAGREED (the heads differ: the caller raises, collectively) or RUN_FINISH (agreed, but
   the rows' free sizes are not all key.free: the caller finishes from the table). */
static PyObject *run(Context *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 && nargs != 9) {
        PyErr_SetString(PyExc_TypeError,
                        "fast run: (group, info, algorithm, name, in_ptr, out_ptr, key, policy[, scratch_ptr])");
        return NULL;
    }
    char *scratch = NULL;
    if (nargs == 9 && (scratch = (char *)PyLong_AsVoidPtr(args[8])) == NULL && PyErr_Occurred())
        return NULL;
    Policy policy = {0};
    if (self->shm && read_policy(args[7], &policy) < 0)
        return NULL;
    char *in = (char *)PyLong_AsVoidPtr(args[4]);
    if (in == NULL && PyErr_Occurred())
        return NULL;
    char *out = (char *)PyLong_AsVoidPtr(args[5]);
    if (out == NULL && PyErr_Occurred())
        return NULL;
    Py_buffer kb;
    if (PyObject_GetBuffer(args[6], &kb, PyBUF_SIMPLE) < 0)
        return NULL;
    if (kb.len != (Py_ssize_t)sizeof(OpKey)) {
        PyBuffer_Release(&kb);
        PyErr_Format(PyExc_ValueError, "fast run: a key is %d int64", (int)(sizeof(OpKey) / 8));
        return NULL;
    }
    OpKey key;
    memcpy(&key, kb.buf, sizeof key);
    PyBuffer_Release(&kb);
    int split = key.kind == KIND_SLOT_SPLIT;
    if (split && !split_in_bounds(&key)) {
        PyErr_SetString(PyExc_ValueError, "fast run: a bad key");
        return NULL;
    }
    if (split)
        key.kind = KIND_SLOT_REDUCE;
    int cma = key.kind == KIND_CMA_COPY;
    if (cma && !self->cma) {
        PyErr_SetString(PyExc_ValueError, "fast run: a bad key (cross-memory attach is off)");
        return NULL;
    }
    if (cma)
        key.kind = KIND_SLOT_COPY;
    int in_slots = key.kind == KIND_SLOT_COPY || key.kind == KIND_SLOT_REDUCE;
    if (in_slots)
        key.kind -= KIND_SLOT_COPY - KIND_COPY;
    if ((key.kind != KIND_COPY && key.kind != KIND_REDUCE && key.kind != KIND_MPI) ||
        (key.kind == KIND_MPI && (self->bcast == NULL || ((key.nk > 0 || key.pre_run > 0) && scratch == NULL))) ||
        (in_slots && (!self->shm || self->payloads == NULL)) ||
        !key_in_bounds(&key, self->n, cma ? (Py_ssize_t)key.nbytes
                                          : in_slots ? (Py_ssize_t)self->payload_bytes
                                                     : self->row_bytes - HEAD_WORDS * 8)) {
        PyErr_SetString(PyExc_ValueError, "fast run: a bad key");
        return NULL;
    }
    Py_ssize_t slot = -1;
    if (self->record && self->ring != NULL) {
        slot = self->ring->begin(args[0], args[3], args[2], args[1]);
        if (slot == -2)
            return NULL;
    }
    char *mine = self->table + self->rank * self->row_bytes;
    memcpy(mine, key.head, sizeof key.head);
    if (key.no_descriptor)
        memset(mine + MINE_WORDS * 8, 0xff, (HEAD_WORDS - MINE_WORDS) * 8);
    if (key.nbytes && !in_slots)
        memcpy(mine + HEAD_WORDS * 8, in, (size_t)key.nbytes);
    /* the parity of the exchange below (shm_exchange: count + 1); a peer reads this rank's
       payload slot of that parity until it enters its next exchange, and this rank cannot get
       two exchanges ahead of it (shm_table's argument for the rows' slots) */
    int par = in_slots ? (int)((*self->count + 1) & 1) : 0;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    if (cma) { /* the descriptor the peers read this rank's input by (cma_blocks) */
        int64_t *desc = (int64_t *)self->payloads[2 * self->rank + par];
        desc[0] = (int64_t)getpid();
        desc[1] = (int64_t)(intptr_t)in;
        desc[2] = key.nbytes;
    } else if (key.nbytes && in_slots) {
        copy(self, key.nbytes >= STREAM_FROM, self->payloads[2 * self->rank + par], in, (size_t)key.nbytes);
    }
    if (self->shm)
        shm_exchange(self, &policy);
    else
        rc = self->allgather((const void *)self->in_place, 0, self->byte_type, self->table, (int)self->row_bytes,
                             self->byte_type, self->comm);
    Py_END_ALLOW_THREADS
    int status = RUN_DONE, bad = 0;
    int64_t failed = 0; /* KIND_CMA_COPY: cma_finish's verdict */
    for (Py_ssize_t r = 0; rc == 0 && r < self->n; r++) {
        const char *row = self->table + r * self->row_bytes;
        int64_t free;
        memcpy(&free, row + 2 * 8, 8);
        if (memcmp(row, key.head, AGREED_BYTES) != 0)
            status = RUN_DISAGREED;
        else if (key.free >= 0 && free != key.free && status == RUN_DONE)
            status = RUN_FINISH;
    }
    if (rc == 0 && status == RUN_DONE && key.kind == KIND_MPI) {
        /* every rank is in this call (the exchange waited for all): MPI's blocking collective,
           as collectives.py's path under wait.all_present */
        Py_BEGIN_ALLOW_THREADS
        if (key.pre_run > 0) { /* the input as MPI sends it, into the send area */
            char *send = scratch + pieces_bytes(&key, self->n);
            walk_copy(key.pre_size, key.pre_src, key.pre_dst, key.pre_run, in, send);
            in = send;
        }
        rc = mpi_call(self, &key, in, key.nk ? scratch : out);
        Py_END_ALLOW_THREADS
        if (rc == 0 && key.nk) /* MPI's pieces, rank by rank, rearranged into `out` */
            bad = blocks(self, &key, strided_rows(self, scratch, (Py_ssize_t)(key.count * SIZE[key.dtype])), self->n,
                         out) < 0;
    } else if (rc == 0 && status == RUN_DONE && in_slots) {
        Py_BEGIN_ALLOW_THREADS
        if (split)
            split_reduce(self, &key, par, out, &policy);
        else if (cma)
            failed = cma_finish(self, par, cma_blocks(self, &key, par, in, out), &policy);
        else
            bad = blocks(self, &key, payload_rows(self, par), self->n, out) < 0;
        Py_END_ALLOW_THREADS
    } else if (rc == 0 && status == RUN_DONE) {
        bad = blocks(self, &key, table_rows(self), self->n, out) < 0;
    }
    if (rc != 0 || bad || status == RUN_DONE) {
        if (slot >= 0 && self->ring->end(slot) < 0)
            return NULL;
        if (rc != 0)
            return PyErr_Format(PyExc_RuntimeError, "MPI error %d in the exchange or the collective", rc);
        if (bad)
            return PyErr_Format(PyExc_ValueError, "fast run: no kernel %lld", (long long)key.kernel);
        if (failed) {
            errno = (int)(-failed % 4096);
            return PyErr_Format(PyExc_RuntimeError, "%s: rank %lld could not read a peer's input (process_vm_readv: "
                                "%s)", PyUnicode_AsUTF8(args[3]), (long long)(-failed / 4096 - 1), strerror(errno));
        }
        return PyLong_FromLong(RUN_DONE);
    }
    return PyLong_FromSsize_t((slot + 1) * 4 + status);
}

static PyMethodDef context_methods[] = {
    {"exchange", (PyCFunction)exchange, METH_O, "exchange(policy): the shared table's exchange"},
    {"run", (PyCFunction)(void (*)(void))run, METH_FASTCALL,
     "run(group, info, algorithm, name, in_ptr, out_ptr, key, policy[, scratch_ptr]): a collective finished here"},
    {NULL, NULL, 0, NULL},
};

static PyObject *get_record(Context *self, void *unused) { return PyBool_FromLong(self->record); }

/* A flag setter's value: 0 or 1, or -1 with an exception (the attribute cannot be deleted). */
static int flag_value(PyObject *value, const char *name)
{
    int v = value == NULL ? -1 : PyObject_IsTrue(value);
    if (v < 0 && !PyErr_Occurred())
        PyErr_Format(PyExc_TypeError, "%s cannot be deleted", name);
    return v;
}

static int set_record(Context *self, PyObject *value, void *unused)
{
    int v = flag_value(value, "record");
    if (v < 0)
        return -1;
    self->record = v;
    return 0;
}

static PyObject *get_cma(Context *self, void *unused) { return PyBool_FromLong(self->cma); }

static int set_cma(Context *self, PyObject *value, void *unused)
{
    int v = flag_value(value, "cma");
    if (v < 0)
        return -1;
    if (v && (!self->shm || self->payloads == NULL)) {
        PyErr_SetString(PyExc_ValueError, "cma needs the shared table's payload slots");
        return -1;
    }
    self->cma = v;
    return 0;
}

static PyGetSetDef getset[] = {
    {"record", (getter)get_record, (setter)set_record, "record calls in the flight ring (default True)", NULL},
    {"cma", (getter)get_cma, (setter)set_cma,
     "run KIND_CMA_COPY keys (set once every rank of the group can read its peers' memory: cma.py)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ContextType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mpipar_agreement_fast.Context",
    .tp_basicsize = sizeof(Context),
    .tp_vectorcall_offset = offsetof(Context, vectorcall),
    .tp_dealloc = (destructor)dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_call = PyVectorcall_Call,
    .tp_getset = getset,
    .tp_methods = context_methods,
    .tp_doc = "one group's small all-reduce: ctx(group, info, algorithm, data_ptr, key[, policy])",
};

/* A handle (C int or pointer; mpi4py gives either as a Python int, maybe unsigned): its low 64 bits. */
static intptr_t handle(PyObject *h) { return (intptr_t)PyLong_AsUnsignedLongLongMask(h); }

/* context(allgather, allreduce, comm, byte, in_place, types (7), ops (3), table_addr, row_bytes, n, rank,
           ring_api_or_None, keep[, shared[, more]]); shared: (slot addresses (2n: rank r's slot p at 2r + p),
           epoch addresses (n), count address, payload slot addresses (2n, or () for none), payload bytes) of
           the group's ShmTable, or None; more: the addresses of
           MPI_Bcast, MPI_Alltoall and MPI_Reduce_scatter_block (KIND_MPI), or None */
static PyObject *context(PyObject *mod, PyObject *args)
{
    PyObject *fn, *fn2, *comm, *byte, *in_place, *types, *ops, *table, *ring, *keep, *shared = Py_None,
             *more = Py_None, *stream = Py_None;
    Py_ssize_t row_bytes, n, rank;
    if (!PyArg_ParseTuple(args, "OOOOOO!O!OnnnOO|OOO", &fn, &fn2, &comm, &byte, &in_place, &PyTuple_Type, &types,
                          &PyTuple_Type, &ops, &table, &row_bytes, &n, &rank, &ring, &keep, &shared, &more, &stream))
        return NULL;
    copy_fn stream_fn = NULL;
    if (stream != Py_None && (stream_fn = (copy_fn)PyLong_AsVoidPtr(stream)) == NULL && PyErr_Occurred())
        return NULL;
    void *extra[3] = {NULL, NULL, NULL}; /* MPI_Bcast, MPI_Alltoall, MPI_Reduce_scatter_block */
    if (more != Py_None) {
        if (!PyTuple_Check(more) || PyTuple_GET_SIZE(more) != 3) {
            PyErr_SetString(PyExc_ValueError, "fast context: more = (bcast, alltoall, reduce_scatter_block)");
            return NULL;
        }
        for (int i = 0; i < 3; i++)
            extra[i] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(more, i));
        if (PyErr_Occurred())
            return NULL;
        if (extra[0] == NULL || extra[1] == NULL || extra[2] == NULL)
            extra[0] = extra[1] = extra[2] = NULL;
    }
    PyObject *slot_addrs = NULL, *epoch_addrs = NULL, *count = NULL, *payload_addrs = NULL;
    long long payload_bytes = 0;
    if (shared != Py_None &&
        (!PyArg_ParseTuple(shared, "O!O!OO!L", &PyTuple_Type, &slot_addrs, &PyTuple_Type, &epoch_addrs, &count,
                           &PyTuple_Type, &payload_addrs, &payload_bytes) ||
         PyTuple_GET_SIZE(slot_addrs) != 2 * n || PyTuple_GET_SIZE(epoch_addrs) != n ||
         (PyTuple_GET_SIZE(payload_addrs) != 2 * n && PyTuple_GET_SIZE(payload_addrs) != 0) || payload_bytes < 0)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError,
                            "fast context: shared = (2n slots, n epochs, count, 2n payload slots or (), payload bytes)");
        return NULL;
    }
    if (PyTuple_GET_SIZE(types) != 7 || PyTuple_GET_SIZE(ops) != 3) {
        PyErr_SetString(PyExc_ValueError, "fast context: 7 datatypes and 3 ops");
        return NULL;
    }
    RingApi *api = NULL;
    if (ring != Py_None && (api = PyCapsule_GetPointer(ring, "mpipar_flight_ring.api")) == NULL)
        return NULL;
    void *f = PyLong_AsVoidPtr(fn);
    void *f2 = PyLong_AsVoidPtr(fn2);
    void *t = PyLong_AsVoidPtr(table);
    if (PyErr_Occurred())
        return NULL;
    if (f == NULL || f2 == NULL || t == NULL || n < 1 || rank < 0 || rank >= n || row_bytes <= HEAD_WORDS * 8) {
        PyErr_SetString(PyExc_ValueError, "fast context: bad arguments");
        return NULL;
    }
    Context *self = PyObject_New(Context, &ContextType);
    if (self == NULL)
        return NULL;
    self->shm = 0;
    self->slots = NULL;
    self->epochs = NULL;
    self->count = NULL;
    self->payloads = NULL;
    self->payload_bytes = 0;
    self->stream = stream_fn;
    self->cma = 0;
    self->rows = PyMem_Calloc((size_t)n, sizeof(char *));
    self->name = NULL;
    self->keep = NULL;
    if (self->rows == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    if (shared != Py_None) {
        self->shm = 1;
        self->slots = PyMem_Calloc((size_t)(2 * n), sizeof(char *));
        self->epochs = PyMem_Calloc((size_t)n, sizeof(int64_t *));
        if (self->slots == NULL || self->epochs == NULL) {
            Py_DECREF(self);
            return PyErr_NoMemory();
        }
        for (Py_ssize_t i = 0; i < 2 * n; i++)
            self->slots[i] = (char *)PyLong_AsVoidPtr(PyTuple_GET_ITEM(slot_addrs, i));
        for (Py_ssize_t i = 0; i < n; i++)
            self->epochs[i] = (int64_t *)PyLong_AsVoidPtr(PyTuple_GET_ITEM(epoch_addrs, i));
        self->count = (int64_t *)PyLong_AsVoidPtr(count);
        if (PyTuple_GET_SIZE(payload_addrs) && payload_bytes > 0) {
            if ((self->payloads = PyMem_Calloc((size_t)(2 * n), sizeof(char *))) == NULL) {
                Py_DECREF(self);
                return PyErr_NoMemory();
            }
            for (Py_ssize_t i = 0; i < 2 * n; i++)
                self->payloads[i] = (char *)PyLong_AsVoidPtr(PyTuple_GET_ITEM(payload_addrs, i));
            self->payload_bytes = payload_bytes;
        }
        if (PyErr_Occurred()) {
            Py_DECREF(self);
            return NULL;
        }
    }
    self->vectorcall = fast_vectorcall;
    self->allgather = (allgather_fn)f;
    self->allreduce = (allreduce_fn)f2;
    self->bcast = (bcast_fn)extra[0];
    self->alltoall = (allgather_fn)extra[1];
    self->reduce_scatter_block = (allreduce_fn)extra[2];
    self->comm = handle(comm);
    self->byte_type = handle(byte);
    self->in_place = handle(in_place);
    for (int k = 0; k < 7; k++)
        self->types[k] = handle(PyTuple_GET_ITEM(types, k));
    for (int k = 0; k < 3; k++)
        self->ops[k] = handle(PyTuple_GET_ITEM(ops, k));
    self->table = (char *)t;
    self->row_bytes = row_bytes;
    self->n = n;
    self->rank = rank;
    self->ring = api;
    self->record = 1;
    self->name = PyUnicode_InternFromString("all_reduce");
    Py_INCREF(keep);
    self->keep = keep;
    if (PyErr_Occurred() || self->name == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyMethodDef methods[] = {
    {"context", context, METH_VARARGS,
     "context(allgather, allreduce, comm, byte, in_place, types, ops, table_addr, row_bytes, n, rank, ring_api, "
     "keep[, shared[, (bcast, alltoall, reduce_scatter_block)]])"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "mpipar_agreement_fast", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit_mpipar_agreement_fast(void)
{
    if (PyType_Ready(&ContextType) < 0)
        return NULL;
    return PyModule_Create(&module);
}
