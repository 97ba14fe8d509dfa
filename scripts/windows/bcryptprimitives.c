/*
 * bcryptprimitives.c: a stand-in bcryptprimitives.dll for running the Windows build under Wine 8.
 *
 * Rust's standard library (1.78+) gets its random bytes (HashMap seeds, and through getrandom the
 * TLS stack) from ProcessPrng in bcryptprimitives.dll, which Windows 10+ has and Wine 8 lacks:
 * the .exe then fails to load. scripts/check-windows.sh builds this file with mingw-w64 and puts
 * the DLL beside the .exe. It implements ProcessPrng over RtlGenRandom (exported by advapi32 as
 * SystemFunction036), which Wine does have. Never ship it to a real Windows machine: there the
 * system's own DLL is the one to use.
 */
#include <windows.h>

/* RtlGenRandom; declared here rather than through <ntsecapi.h> and its macro. */
BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

/* Fills `data` with `length` random bytes; always TRUE on Windows, FALSE here on failure. */
BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length)
{
    while (length > 0) {
        ULONG chunk = length > 0x40000000 ? 0x40000000 : (ULONG)length;
        if (!SystemFunction036(data, chunk)) {
            return FALSE;
        }
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
