/* Preloaded into TFF's worker_binary (LD_PRELOAD) by fedprune/runtime/worker_heap.py.
 *
 * Starts one thread that waits for SIGUSR2 and then calls glibc's
 * malloc_trim(0), which hands every arena's whole free pages back to the OS
 * (madvise; no live block moves). After each trim the thread renames itself
 * "fptrim N" (N = trims so far), which the Python side reads from
 * /proc/PID/task/TID/comm to know that a trim it asked for has finished.
 *
 * SIGUSR2 is blocked here, in the constructor, before the worker's own code
 * runs, so every thread the worker starts inherits the blocked mask and the
 * signal is only ever taken by sigwait below (a signal handler could not call
 * malloc_trim: it is not async-signal-safe). The Python side sends SIGUSR2 only
 * to a process that has this thread (worker_heap.py), since SIGUSR2's default
 * action ends a process.
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>

static sigset_t trim_signals;

static void *trim_loop(void *unused) {
  char name[16];
  unsigned long trims = 0;
  int sig;
  (void)unused;
  pthread_setname_np(pthread_self(), "fptrim 0");
  for (;;) {
    if (sigwait(&trim_signals, &sig) != 0) continue;
    malloc_trim(0);
    trims++;
    snprintf(name, sizeof name, "fptrim %lu", trims % 100000000UL);
    pthread_setname_np(pthread_self(), name);
  }
  return NULL;
}

__attribute__((constructor)) static void start_trim_thread(void) {
  pthread_t thread;
  sigemptyset(&trim_signals);
  sigaddset(&trim_signals, SIGUSR2);
  if (pthread_sigmask(SIG_BLOCK, &trim_signals, NULL) != 0) return;
  if (pthread_create(&thread, NULL, trim_loop, NULL) == 0) pthread_detach(thread);
}
